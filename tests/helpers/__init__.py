"""Helpers shared by the tests (importable as ``helpers.*``: pytest puts tests/ on sys.path).

runs.py         a run of ``generate`` in a child process (optionally SIGKILLed), checkpoint flattening
tiny_models.py  tiny random-weight diffusers/transformers models and our MVDream UNet, saved offline
Configs are composed with ``fourdfy.config.compose_run_config``, as run.py composes them.
"""
