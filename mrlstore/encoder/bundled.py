"""The bundled encoder's weights (shipped in ``weights/``): their identity, read without torch, and which input
size reproduces a store's vectors with them (loading them is :func:`mrlstore.encoder.runner.load_bundled_encoder`)."""

from __future__ import annotations

from pathlib import Path

from mrlstore.errors import EncoderUnavailableError

BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Earlier releases' bundled files whose tensors the installed file holds unchanged, with the input size they
# resized to: {earlier sha256: (installed sha256, px)}. Their stores keep encoding images, at that size, with
# the same vectors. An entry applies only while the installed file is the one named (a retrain clears it).
SAME_TENSORS_AT = {
    "4f7ae9c713eda09b42f18aebe06df817b99dbb971ffe14adbe31ceb397837c6a": (
        "cfdfe268636bbcc0166c51d130c4100e667c5ac107f632e664167888aa2cf87a",
        160,
    ),  # v3 at 160 px
}


def bundled_weights_id() -> str | None:
    """The sha256 of the installed bundled encoder's weights, read without torch (None when not installed)."""
    try:
        return (BUNDLED_WEIGHTS_DIR / "mrl_lite0.sha256").read_text().split()[0]
    except (OSError, IndexError):
        return None


def bundled_input_size(recorded: str | None, where: object) -> int | None:
    """The input size at which the installed bundled weights reproduce a store's vectors: None for the weights'
    own, another for an earlier release's file with the same tensors. A store made by bundled weights with other
    tensors raises: its image queries would otherwise answer with unrelated rows."""
    installed = bundled_weights_id()
    if recorded == installed:
        return None
    same_as, size = SAME_TENSORS_AT.get(recorded or "", (None, None))
    if same_as is not None and same_as == installed:
        return size
    made_by = f"weights with sha256 {recorded[:12]}..." if recorded else "an mrlstore before the v3 encoder"
    raise EncoderUnavailableError(
        f"{where} holds vectors of the bundled encoder of {made_by}, but the installed bundled encoder differs "
        f"(sha256 {str(installed)[:12]}...), so its image vectors would not match them. Pass that encoder: "
        "mrlstore.open(path, encoder=mrlstore.load_encoder(<its weights file>)); or query with vectors; or "
        "re-add the images to a new store"
    )
