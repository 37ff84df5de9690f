"""A trained run, ready to score images: its best (or another) checkpoint loaded with any
evaluation overrides, its mixture fitted after training if it is so made (an object it
holds beside the network), and its calibration from the validation images."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from vtadl.checkpoints import BEST, model_from_checkpoint
from vtadl.config import (
    FITTED_AFTER_TRAINING,
    Config,
    EvalConfig,
    gaussians,
    kernel_scope,
    resolved_image_score,
)
from vtadl.data.source import Source, category_source
from vtadl.devices import pick_device
from vtadl.exceptions import ConfigError, RunError
from vtadl.inference.maps import log_mse, log_near, peak, scored, standardised
from vtadl.scoring.calibration import (
    COMPOSITE,
    NEAR_FLOOR,
    Calibration,
    calibration_key,
    image_part,
    read_calibration,
    store_calibration,
)
from vtadl.scoring.mixture_fit import fitted_mixtures
from vtadl.scoring.mixtures import FittedMixture
from vtadl.scoring.neighbours import ImageNeighbours
from vtadl.scoring.raw import Raw, raw_scores, raw_scores_each

log = logging.getLogger(__name__)

# Test, validation and new images are scored this many at a time (their tiles together):
# the batches of the forward pass fill, and the maps of only this many are held unscored.
IMAGES_PER_PASS = 8

T = TypeVar("T")


class Scorer:
    """A trained run, ready to turn images into full-resolution anomaly maps.

    `eval_overrides` score it another way; `mixture_fit` and `n_gaussians` refit its mixture
    (em or kernel with any K, for a run fitted either way: the network stays as trained);
    `mixture`, a mixture already fitted to this checkpoint for the run's config so changed
    (a search fits several K at once). Any of them is calibrated afresh without touching the
    run's calibration.json, as is any checkpoint but the best. `also`: further K to fit with
    the scorer's own, from the same encoding of the training tokens (`fitted`, by K).
    `calibrated=False` leaves `calibration` None, for the caller to set (`scorers_for_ks`
    calibrates several from one encoding of the validation images). `device`: where to
    score, instead of the run's `train.device`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        checkpoint: str = BEST,
        eval_overrides: dict | None = None,
        mixture_fit: str | None = None,
        n_gaussians: int | str | None = None,
        mixture: FittedMixture | None = None,
        also: list[int | str] | None = None,
        calibrated: bool = True,
        device: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise RunError(f"run folder not found: {self.run_dir}")
        self.config, model, self.state = model_from_checkpoint(
            self.run_dir / "checkpoints" / checkpoint
        )
        overrides = {k: v for k, v in (eval_overrides or {}).items() if v is not None}
        if overrides:
            self.config = self.config.override(eval=overrides)
        refitted = (mixture_fit, n_gaussians) != (None, None) or mixture is not None
        if refitted:
            self.config = refit(self.config, mixture_fit, n_gaussians)
        # "auto" settings, resolved once for every image this scorer sees
        self.image_score = resolved_image_score(self.config)
        self.kernel_scope = kernel_scope(self.config)
        self.device = pick_device(device or self.config.train.device)
        self.model = model.to(self.device)
        self._source: Source | None = None
        self.mixture = mixture.to(self.device) if mixture is not None else None
        self.fitted: dict[int | str, FittedMixture] = {}
        if self.mixture is None and self.config.train.mixture_fit in FITTED_AFTER_TRAINING:
            ks = list(dict.fromkeys([gaussians(self.config), *(also or [])]))
            self.fitted = dict(zip(ks, self.fit_mixtures(checkpoint, ks)))
            self.mixture = self.fitted[ks[0]]
        self.neighbours = self._neighbours()
        # The calibration of the run's own score and best checkpoint is kept; other scores,
        # mixtures and checkpoints are calibrated afresh, and so is a calibration made for
        # other settings (another version's defaults) or by an older version that lacks
        # what the score needs.
        own = not (overrides or refitted) and checkpoint == BEST
        path = self.run_dir / "calibration.json"
        self.calibration = read_calibration(path, self.config) if own else None
        if self.calibration is None and calibrated:
            self.calibration = calibrate(self)
            if own:
                store_calibration(path, self.calibration)

    def fit_mixtures(self, checkpoint: str, ks: list[int | str]) -> list[FittedMixture]:
        """This checkpoint's mixture fitted the run's way with each K of `ks`."""
        return fitted_mixtures(
            self.model,
            self.run_dir,
            checkpoint,
            self.state["epoch"],
            self.source,
            self.device,
            self.config.train.seed,
            how=self.config.train.mixture_fit,
            ks=ks,
            shifts=self.eval.grid_shifts,
            by_position=self.kernel_scope == "position",
        )

    @property
    def n_gaussians(self) -> int:
        """K as used: the fitted mixture's components (per position for a kernel by
        position), or the trained head's."""
        return self.mixture.n_gaussians if self.mixture else self.model.mdn.n_gaussians

    def _neighbours(self) -> ImageNeighbours | None:
        if self.image_score != "peak+recon+neighbour":
            return None
        neighbours = self.mixture.neighbours() if self.mixture else None
        if neighbours is None:
            raise ConfigError(
                "image_score peak+recon+neighbour needs a kernel by position, and this "
                "run's mixture is not one"
            )
        return neighbours

    @property
    def eval(self) -> EvalConfig:
        return self.config.eval

    @property
    def source(self) -> Source:
        if self._source is None:
            self._source = category_source(self.config)
        return self._source

    def raw(self, inputs: np.ndarray) -> Raw:
        return raw_scores(
            self.model,
            inputs,
            self.config,
            self.device,
            mixture=self.mixture,
            neighbours=self.neighbours,
        )

    def raw_many(self, inputs: list[np.ndarray]) -> list[Raw]:
        """The raw scores of several images (their inputs: one image, or its tiles each),
        scored in shared batches: a mixture's per-call work (a kernel's tens of thousands
        of Gaussians) is then spread over a whole batch, not repeated for every image."""
        return raw_each([self], inputs)[0]

    def scored(
        self,
        raw: Raw,
        corners: np.ndarray | None,
        shape: tuple[int, int],
        calibration: Calibration | None = None,
    ) -> tuple[np.ndarray, float]:
        """One image's map at its original resolution, from the raw scores of its input(s),
        and its image score (`vtadl.inference.maps.image_level`)."""
        cal = calibration or self.calibration
        return scored(raw, corners, shape, cal, self.eval, self.image_score)


def raw_in_passes(
    scorer: Scorer, items: Iterable[T], model_input: Callable[[T], np.ndarray]
) -> Iterator[tuple[T, Raw]]:
    """Each item with the raw scores of its model input, `IMAGES_PER_PASS` items scored
    together; `items` is read lazily, a pass at a time."""
    items = iter(items)
    while chunk := list(itertools.islice(items, IMAGES_PER_PASS)):
        yield from zip(chunk, scorer.raw_many([model_input(item) for item in chunk]))


def scorers_for_ks(
    run_dir: str | Path, checkpoint: str, eval_overrides: dict, ks: list[int | str]
) -> list[Scorer]:
    """A scorer of a run's checkpoint for each K of `ks`, its mixture refitted with that K,
    all from one encoding of the training tokens and one of the validation images (each
    K calibrated on its own scores of them): a search over K pays for the forward passes
    once. Only for a mixture fitted after training (em, kernel)."""
    first = Scorer(
        run_dir, checkpoint, eval_overrides, n_gaussians=ks[0], also=ks[1:], calibrated=False
    )
    scorers = [first] + [
        Scorer(
            run_dir,
            checkpoint,
            eval_overrides,
            n_gaussians=k,
            mixture=first.fitted[k],
            calibrated=False,
        )
        for k in ks[1:]
    ]
    src = first.source
    inputs = [src.model_input("val", i)[0] for i in range(len(src.items("val")))]
    for scorer, raws in zip(scorers, raw_each(scorers, inputs)):
        scorer.calibration = calibrate(scorer, raws)
    return scorers


def raw_each(scorers: list[Scorer], inputs: list[np.ndarray]) -> list[list[Raw]]:
    """The raw scores of each input (one image, or its tiles) under each scorer, for scorers
    of one checkpoint that differ in their mixture only: one forward pass serves them all.
    By scorer, then by input."""
    first = scorers[0]
    together = raw_scores_each(
        first.model,
        np.concatenate(inputs),
        first.config,
        first.device,
        [(scorer.mixture, scorer.neighbours) for scorer in scorers],
    )
    cuts = np.cumsum([len(x) for x in inputs])[:-1]
    return [raw.split(cuts) for raw in together]


def calibrate(scorer: Scorer, raws: list[Raw] | None = None) -> Calibration:
    """Standardisation and threshold from the validation images (normal, held out); `raws`:
    their raw scores under this scorer, if already computed."""
    src, e, how = scorer.source, scorer.eval, scorer.image_score
    items = src.items("val")
    inputs = [src.model_input("val", i) for i in range(len(items))]
    if raws is None:
        raws = [raw for _, raw in raw_in_passes(scorer, inputs, lambda x: x[0])]
    base = Calibration.fit(
        np.concatenate([r.nll for r in raws]), np.concatenate([r.rec for r in raws]), e.scale
    )
    if how in COMPOSITE:
        base = _image_parts(base, raws, e, how)
    maps, scores = zip(
        *(
            scorer.scored(raw, corners, item.shape, base)
            for raw, (_, corners), item in zip(raws, inputs, items)
        )
    )
    threshold = max(scores)
    low = float(np.median(np.concatenate([m.ravel() for m in maps])))
    return replace(
        base,
        image_threshold=threshold,
        display_low=low,
        display_high=low + 2 * max(threshold - low, 1e-6),
        made_for=calibration_key(scorer.config),
    )


def _image_parts(base: Calibration, raws: list[Raw], e: EvalConfig, how: str) -> Calibration:
    """The standardisation of a composite image score's parts over the validation images."""
    if len(raws) < 2:
        log.warning(
            "%s weighs its parts by their spread over the validation images, and %d "
            "is too few: they are added unweighed (raise data.val_fraction)",
            how,
            len(raws),
        )
    peaks = [peak(r, standardised(r.nll, r.rec, base, e.score), base, e) for r in raws]
    base = replace(
        base,
        image_peak=image_part(peaks),
        image_rec=image_part([log_mse(r.rec) for r in raws]),
    )
    if how == "peak+recon+neighbour":
        floor = NEAR_FLOOR * float(np.median([r.near.mean() for r in raws]))
        part = image_part([log_near(r.near, floor) for r in raws])
        base = replace(base, image_near=replace(part, floor=floor))
    return base


def refit(config: Config, how: str | None, k: int | str | None = None) -> Config:
    """The run's config with its mixture fitted after training another way (`how`) or with
    another K. A mixture fitted after training (em, kernel) is refitted either way with any K;
    a mixture trained with the network (sgd) keeps its K, but the trained network's clean
    tokens can be fitted as em or kernel when that is asked for by name."""
    trained = config.train.mixture_fit
    how = how or trained
    if how not in FITTED_AFTER_TRAINING and how != trained:
        raise ConfigError(
            f"a mixture fitted by {how} is trained with the network (vtadl train "
            f"--mixture-fit {how}); after training a run's mixture can be refitted as "
            f"{' or '.join(FITTED_AFTER_TRAINING)} only, got {how!r}"
        )
    if how not in FITTED_AFTER_TRAINING:
        raise ConfigError(
            f"this run's mixture was fitted by {trained}; its K is part of the training and "
            f"cannot change without retraining (a mixture fitted after training can be asked "
            f"for by name: --mixture-fit {' or '.join(FITTED_AFTER_TRAINING)})"
        )
    model = {"n_gaussians": k} if k is not None else {}
    if how != trained and k is None:
        model = {"n_gaussians": "auto"}  # the other fit's own default K
    train = {"mixture_fit": how}
    if trained not in FITTED_AFTER_TRAINING:
        # one mixture for every token fitted beside the trained network, by its likelihood;
        # the head trained with the network is left unused
        model["mdn_condition"] = "global"
        train["mdn_loss"] = "mixture"
    return config.override(train=train, model=model)
