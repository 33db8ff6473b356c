"""The evaluation math (DESIGN §4): a metric registry (`registry`, entries in `entries/`), the streamed
engine that samples, decodes and folds batches (`streaming_eval`, `structure_stream`, `eval_stats`), the
scores themselves (`metrics`, `image_metrics`, `fidelity`, `trajectory_metrics`) and the scenes judge."""
