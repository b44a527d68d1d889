"""A normalisation layer given one value per channel or group: a 1 x 1 feature map of one
image (small inputs, the coarsest levels). torch refuses it with a bare ValueError, from
BatchNorm and GroupNorm in training and from GroupNorm in evaluation too; the trainer and
the evaluation turn it into one line that names the input size to change."""

__all__ = ["TooSmallMapError", "one_value_per_channel"]

# torch's words for it (the same in evaluation, though they say "when training").
_TORCH_WORDS = "Expected more than 1 value per channel when training"


class TooSmallMapError(RuntimeError):
    """A feature map too small for the model's normalisation layers; the message says
    where (a stage's iteration, an evaluation) and which input size fixes it."""


def one_value_per_channel(error):
    """The input size torch names when ``error`` is its one-value-per-channel refusal, else None."""
    text = str(error)
    if isinstance(error, ValueError) and _TORCH_WORDS in text:
        return text.split("got ")[-1]
    return None
