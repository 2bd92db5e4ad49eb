"""The training code of streamiq's own quality model, streamiq-tiny (scripts/train_tiny.py
and scripts/train_two_stream.py are its command lines):

- `model_input`: what the daemon feeds a model (size, CLIP's pixel normalisation);
- `levels`: the distortion parameters per level, read from src/distort/levels.toml,
  the table `streamiq distort` reads too;
- `distortions`: the Python versions of the `streamiq distort` kinds;
- `photos`: the training photographs and the procedural pictures;
- `data`: the groups of distorted crops and their captions, and the cache fingerprint;
- `model`: the image and text towers and the tokenizer;
- `training`: the objective, the training loop and the bundle export.

Importing the package (or `model_input`, `levels`) needs the standard library only.
"""
import time


def log(msg):
    """Prints `msg` after the time of day, at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
