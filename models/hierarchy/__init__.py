"""The teacher hierarchy (DESIGN §3): per image, level 0 splits object from background by k-means and
each finer level cuts an average-linkage tree of the object tokens. `reference` is the scikit-learn /
scipy definition; `batched` computes the same over a chunk in torch (Triton kernels on CUDA)."""
