"""Ray Tune integration: many searches as Tune trials (trainable.py), the experiment's
param space, search algorithm, scheduler and storage (tuner.py), the typed `tune:`
section (schema.py, no ray) and the `run|resume|status|submit|tensorboard` commands (cli.py).

The only package that imports ray, and only inside functions, so that `distsearch --help`
and the rest of the project work without ray installed.
"""
