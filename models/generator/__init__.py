"""The generator (DESIGN §3): the DiT backbone with x and v heads (`dit`, its JVP in `dit_jvp` and
`jvp_attention`), the one-step mean-flow objective (`meanflow`), training (`train_loop`, `train_state`,
`optim`), the flat baseline (`flat`), and sampling a trajectory and editing it (`trajectory`, `edit_suite`)."""
