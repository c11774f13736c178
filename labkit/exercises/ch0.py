"""Chapter 0 (why not full fine-tuning): the checkers of its exercises."""
from ._common import _attempt, _ok, _todo


def check_full_finetune_bytes(fn):
    """fn(n_params) -> bytes of weights + gradients + AdamW's two states, all fp32."""
    for n in (1, 135_000_000, 7_000_000_000):
        done, got = _attempt(fn, n)
        if not done:
            return _todo("full fine-tuning bytes")
        want = 16 * n
        assert got == want, (f"for {n:,} parameters you gave {got:,} bytes; expected {want:,}: "
                             "4 bytes each for the weight, its gradient, and AdamW's m and v")
    return _ok("16 bytes per parameter: weight, gradient, and AdamW's m and v in fp32")
