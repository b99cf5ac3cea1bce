"""Tools for the bundled encoder: training (train_encoder, distill_encoder) and evaluation (encoder_eval).

Run from the repository root as modules, e.g. ``python -m tools.distill_encoder all``; they import each other
as ``tools.<name>`` (no sys.path edits), and need ``pip install -e ".[train]"``.
"""
