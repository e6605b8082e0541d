"""What a training run is: TrainConfig (one model) and TrainGrid (the variants of a [grid]).

Both are plain frozen dataclasses: the spec parser (jobs/) builds them, and the trainer (model/)
and the variant fan-out (cluster/) take them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from capfleet.core.errors import (
    SEED_RANGE,
    THREADS_RANGE,
    CapfleetError,
    check_at_least,
    check_numbers,
    check_range,
)
from capfleet.core.storage import place
from capfleet.model.encoders import ENCODERS, check_weights, encoder_info


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Validated on construction: a bad value names the field."""

    data: str  # a Flickr8k-layout directory or a COCO/Karpathy captions JSON
    out: str  # the model directory to write
    encoder: str = "small_cnn"
    weights: str = "none"  # "imagenet", "none" (random, seeded) or a weights file
    units: int = 256
    embed_dim: int = 256
    dropout: float = 0.5
    epochs: int = 40
    batch_size: int = 16  # images per step; each brings captions_per_image captions
    captions_per_image: int = 5
    learning_rate: float = 1e-3
    # Share of each target word's probability spread evenly over the vocabulary. It keeps the
    # logits' range to a few units instead of a hundred, which a post-training int8 decoder
    # can resolve (docs/train.md); 0 = plain cross-entropy.
    label_smoothing: float = 0.1
    patience: int = 4  # epochs without a better dev loss before stopping
    min_count: int = 1
    max_len: int = 0  # caption tokens incl. start/end; 0 = longest training caption
    time_budget_s: float = 0.0  # stop after the epoch that passes this; 0 = no limit
    seed: int = 0
    threads: int = 0  # TensorFlow threads; 0 = every core
    cache_dir: str = ""  # frozen-encoder features; "" = <out>/../feature_cache
    beam_width: int = 1  # decoding for the test-split evaluation
    # Small CNN on the shapes data only: epochs of pretraining on the generator's per-cell
    # object labels (shapes_objects.jsonl, training split) before captioning; the encoder is
    # then frozen, as a pretrained backbone is (the study's recipe). 0 = trained jointly.
    pretrain_epochs: int = 0

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range(
            self,
            {
                "seed": SEED_RANGE,
                "threads": THREADS_RANGE,
                "beam_width": (1, 64),
                "units": (1, 16384),
                "embed_dim": (1, 16384),
                "epochs": (1, 100_000),
                "batch_size": (1, 65_536),
                "captions_per_image": (1, 100),
                "max_len": (0, 1000),
                "patience": (0, 100_000),
                "pretrain_epochs": (0, 100_000),
                "time_budget_s": (0, 1e8),
            },
        )
        if self.encoder not in ENCODERS:
            raise CapfleetError(
                f"encoder: {self.encoder!r} is not one of {', '.join(sorted(ENCODERS))}"
            )
        check_weights(self.encoder, self.weights_arg)
        positive = ("units", "embed_dim", "epochs", "batch_size", "captions_per_image")
        check_at_least(self, (*positive, "min_count", "beam_width"), 1)
        if self.pretrain_epochs and not encoder_info(self.encoder).trainable:
            raise CapfleetError(
                f"pretrain_epochs: only the small CNN is pretrained here; {self.encoder} "
                "comes with its own weights"
            )
        check_at_least(self, ("patience", "max_len", "threads", "time_budget_s"), 0)
        check_at_least(self, ("pretrain_epochs",), 0)
        if not 0.0 <= self.dropout < 1.0:
            raise CapfleetError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.learning_rate < 1.0:
            raise CapfleetError(f"learning_rate: must be in (0, 1), got {self.learning_rate}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise CapfleetError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if 0 < self.max_len < 3:
            raise CapfleetError(f"max_len: must be 0 (auto) or >= 3, got {self.max_len}")

    @property
    def weights_arg(self) -> str | None:
        return None if self.weights == "none" else self.weights

    @property
    def weights_id(self) -> str:
        """What a frozen backbone's features depend on: its weights, or the seed of random ones."""
        return self.weights if self.weights != "none" else f"none-seed{self.seed}"

    @property
    def feature_cache(self) -> str:
        """Frozen backbones' features: cache_dir, else `feature_cache` beside the model's
        folder, on disk or in the model's object store (where every node reads it)."""
        if self.cache_dir:
            return self.cache_dir
        return str(place(self.out).parent / "feature_cache")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class TrainGrid:
    """A train spec with a [grid]: one TrainConfig per combination of the grid's values, each
    trained into <out>/<name>."""

    out: str  # the parent of every variant's model directory
    variants: tuple[TrainConfig, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        assert len(self.variants) == len(self.names), "one name per variant"
