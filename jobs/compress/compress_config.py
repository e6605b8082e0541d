"""What a compress job is: the trials to run on which models (CompressConfig), and the plan
checked against the models before any work."""

from __future__ import annotations

from dataclasses import dataclass

from capfleet.compression.goal import Goal
from capfleet.compression.recipes import check_for_model, parse_trial
from capfleet.compression.settings import TrialSettings
from capfleet.core.errors import CapfleetError, check_numbers, check_range
from capfleet.core.storage import place
from capfleet.jobs.gallery import DEFAULT_GALLERY_IMAGES, check_gallery_size
from capfleet.model.encoders import encoder_info
from capfleet.model.modeldir import model_data, read_model_manifest


@dataclass(frozen=True)
class CompressConfig:
    """A compress job: every trial on every model, each a task with `cpus_per_trial` CPUs."""

    models: tuple[str, ...]  # trained model directories
    out: str
    trials: tuple[str, ...] = ("fp32", "dynamic", "int8", "qat-int8")
    cpus_per_trial: float = 1.0
    max_retries: int = 1  # a crashed task (worker died) is retried this many times
    settings: TrialSettings = TrialSettings()
    gallery: int = DEFAULT_GALLERY_IMAGES  # test images in OUT/gallery.html; 0 = no gallery
    # A goal instead of a fixed list of trials: the search chooses the trials (compression/goal)
    goal: Goal | None = None
    # where the models' data set is now, when not where their manifests say (a moved model);
    # "" = the manifest's (found from the model directory first)
    data: str = ""

    def __post_init__(self) -> None:
        check_numbers(self)
        if not self.models:
            raise CapfleetError("models: give at least one trained model directory")
        if self.goal is not None and len(self.models) != 1:
            raise CapfleetError(
                f"goal: a goal search chooses a bundle of one model; got {len(self.models)} "
                "models (run one search per model)"
            )
        if not self.trials:
            raise CapfleetError("trials: give at least one trial")
        names = [place(m).name for m in self.models]
        nameless = [m for m, n in zip(self.models, names, strict=True) if n in ("", ".", "..")]
        if nameless:  # its bundles and records go in OUT/bundles/<its folder name>/
            raise CapfleetError(
                f"models: {nameless[0]!r} names no model folder; give the model directory itself"
            )
        if len(set(names)) != len(names):
            raise CapfleetError(f"models: two model directories share a name: {names}")
        for t in self.trials:
            parse_trial(t)  # an unknown recipe is refused here, before any work
        if not 0 < self.cpus_per_trial <= 1024:
            raise CapfleetError(f"cpus_per_trial: must be in (0, 1024], got {self.cpus_per_trial}")
        check_range(self, {"max_retries": (0, 100)})
        check_gallery_size(self.gallery)

    def plan(self) -> list[tuple[str, str]]:
        """(model dir, trial name) for every trial, the fp32 baseline first for each model, so
        that every record has something to be compared with."""
        names = [parse_trial(t).name for t in self.trials]
        if "fp32:fp32" not in names:
            names.insert(0, "fp32:fp32")
        names = list(dict.fromkeys(names))
        return [(m, t) for m in self.models for t in names]


def checked_plan(cfg: CompressConfig) -> list[tuple[str, str]]:
    """The plan, with every model directory read, its data set found (model_data) and every
    trial checked against its model's encoder, so that an impossible trial or a missing data
    set is refused before any task starts."""
    plan = cfg.plan()
    for model_dir in cfg.models:
        manifest = read_model_manifest(model_dir)
        model_data(model_dir, manifest, cfg.data)
        try:
            info = encoder_info(manifest["config"]["encoder"])
        except (KeyError, TypeError) as e:
            raise CapfleetError(f"{model_dir}/manifest.json: malformed config ({e})") from e
        for m, trial in plan:
            if m == model_dir:
                check_for_model(parse_trial(trial), info.trainable, info.name)
    return plan
