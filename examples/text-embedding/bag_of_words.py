"""A bag-of-words text classifier for Confide: ``model.name = "bag_of_words:embedding_bag"``.

Samples are rows of token ids (integers, 0 = padding), as ``make_data.py`` writes them; Confide
keeps integer ``.npz`` inputs as integers, so they reach ``nn.EmbeddingBag`` unchanged.
"""

from __future__ import annotations

from torch import nn

#: token ids are 0 .. VOCAB_SIZE - 1 (make_data.py uses the same value)
VOCAB_SIZE = 256


class EmbeddingBagClassifier(nn.Module):
    """Mean of the tokens' embeddings (padding ignored), then a linear layer."""

    def __init__(self, vocab_size: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):  # noqa: D102
        return self.head(self.embed(tokens))


def embedding_bag(*, input_shape: tuple[int, ...], num_classes: int,
                  hidden_units: int = 32) -> nn.Module:
    """Confide's model factory: ``input_shape`` is ``(sequence_length,)``."""
    if len(input_shape) != 1:
        raise ValueError(f"expects token-id rows shaped (sequence_length,), got {input_shape}")
    return EmbeddingBagClassifier(VOCAB_SIZE, hidden_units, num_classes)
