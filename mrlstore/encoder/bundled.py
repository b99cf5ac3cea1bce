"""The bundled encoder's weights (shipped in ``weights/``): their identity, read without torch, the check that a
store's vectors came from them (loading them is :func:`mrlstore.encoder.runner.load_bundled_encoder`)."""

from __future__ import annotations

from pathlib import Path

from mrlstore.errors import EncoderUnavailableError

BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def bundled_weights_id() -> str | None:
    """The sha256 of the installed bundled encoder's weights, read without torch (None when not installed)."""
    try:
        return (BUNDLED_WEIGHTS_DIR / "mrl_lite0.sha256").read_text().split()[0]
    except (OSError, IndexError):
        return None


def check_bundled_weights(recorded: str | None, where: object) -> None:
    """A store's vectors and its image queries must come from the same bundled weights: a store made by an
    earlier release (another encoder) would otherwise answer image queries with unrelated rows."""
    installed = bundled_weights_id()
    if recorded == installed:
        return
    made_by = f"weights with sha256 {recorded[:12]}..." if recorded else "an mrlstore before the v3 encoder"
    raise EncoderUnavailableError(
        f"{where} holds vectors of the bundled encoder of {made_by}, but the installed bundled encoder differs "
        f"(sha256 {str(installed)[:12]}...), so its image vectors would not match them. Pass that encoder: "
        "mrlstore.open(path, encoder=mrlstore.load_encoder(<its weights file>)); or query with vectors; or "
        "re-add the images to a new store"
    )
