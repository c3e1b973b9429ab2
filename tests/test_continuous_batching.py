"""Step-level continuous batching on tiny weights: a job gives the image it gives alone, whoever shares its forwards.

Jobs join at step boundaries of jobs already running (submitted from the running job's ``on_step``, so the
step they join at is exact), with other schedulers, step counts, guidance (CFG on and off), strengths,
control windows, image-to-image starts and extra ControlNets; each result is compared with the same job run
alone by the static loop, which test_instantid_reference.py pins to a reference built from diffusers' pieces.
The batcher's policy (oldest-first admission under a row limit, turns between groups, cancellation, one
job's failure staying its own) is checked on the same model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest

from deployments.instantid.continuous import ContinuousBatcher, Outcome, StepGroup
from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.params import ControlSetting, GenerationParams
from deployments.instantid.schedulers import SCHEDULER_NAMES
from tests.support import sample_control_maps, sample_init_image

KEYPOINTS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
OTHER_KEYPOINTS = np.array([[12, 30], [30, 28], [20, 40], [14, 52], [28, 52]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)
BASE = GenerationParams(width=64, height=64, seed=7, num_inference_steps=6, guidance_scale=5.0)
TOLERANCE = 2  # out of 255: what the issue allows; float reassociation across batch sizes stays far below it


def identity(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=512).astype(np.float32) * 20


@pytest.fixture(scope="module")
def text(prompt_encoder):
    return {
        True: prompt_encoder.encode(["a portrait photo"], ["blurry"], do_classifier_free_guidance=True)[0],
        False: prompt_encoder.encode(["a watercolor"], [None], do_classifier_free_guidance=False)[0],
    }


def make_job(text, params: GenerationParams, seed: int = 0, keypoints=KEYPOINTS, **extra) -> DenoiseJob:
    return DenoiseJob(params, identity(seed), keypoints, BOX, text[params.do_classifier_free_guidance], **extra)


def alone(model, job: DenoiseJob) -> np.ndarray:
    return model.generate([dataclasses.replace(job, on_step=None, _state={})])[0]


def group(model, key: str = "g") -> StepGroup:
    return StepGroup(key, model, lambda: nullcontext(0.0))


class Scenario:
    """Jobs submitted to a batcher now or when an earlier job ends a given step; records every job's steps in order.

    Submitting from the running job's ``on_step`` makes the join point exact: the batcher admits the new job at
    that very step boundary.
    """

    def __init__(self, batcher: ContinuousBatcher) -> None:
        self.batcher = batcher
        self.steps: list[tuple[str, int]] = []
        self.futures: dict[str, Future] = {}
        self.cancels: dict[str, Callable[[], None]] = {}
        self._later: dict[tuple[str, int], list[tuple[str, DenoiseJob, StepGroup]]] = {}
        self._drop_at: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(
        self, name: str, job: DenoiseJob, group: StepGroup, after: tuple[str, int] | None = None, drop_at: int = 0
    ) -> None:
        job.on_step = self._hook(name)
        if drop_at:
            self._drop_at[name] = drop_at
        if after is None:
            self._submit(name, job, group)
        else:
            self._later.setdefault(after, []).append((name, job, group))

    def _submit(self, name: str, job: DenoiseJob, group: StepGroup) -> None:
        self.futures[name], self.cancels[name] = self.batcher.submit(job, group)

    def _hook(self, name: str) -> Callable[[int, int, object], bool]:
        def on_step(step: int, total: int, latents: object) -> bool:
            with self._lock:
                self.steps.append((name, step))
            for later in self._later.pop((name, step), []):
                self._submit(*later)
            return self._drop_at.get(name) == step

        return on_step

    def results(self, timeout: float = 120) -> dict[str, Outcome]:
        """Every job's outcome; jobs submitted later are waited for through the jobs they follow."""
        outcomes: dict[str, Outcome] = {}
        while len(outcomes) < len(self.futures) or self._later:
            name = next(n for n in list(self.futures) if n not in outcomes)
            outcomes[name] = self.futures[name].result(timeout)
        return outcomes


@pytest.fixture
def batcher():
    made: list[ContinuousBatcher] = []

    def make(max_rows: int = 64, turn_steps: int = 4) -> ContinuousBatcher:
        made.append(ContinuousBatcher(max_rows=max_rows, turn_steps=turn_steps, gather_s=0.3))
        return made[-1]

    yield make
    for one in made:
        one.close()


def assert_like_alone(model, jobs: dict[str, DenoiseJob], outcomes: dict[str, Outcome]) -> None:
    for name, job in jobs.items():
        expected = alone(model, job)
        got = outcomes[name].images
        assert got is not None and got.shape == expected.shape, name
        difference = int(np.abs(got.astype(int) - expected.astype(int)).max())
        assert difference <= TOLERANCE, (name, difference)


# ------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_a_job_joining_mid_way_gives_its_alone_image_for_every_scheduler(denoiser, text, batcher, scheduler) -> None:
    """A runs 7 steps with ``scheduler``; B (the next scheduler, 5 steps, another identity, pose, strengths and
    window, two images) joins after A's step 3; C (CFG off, 4 steps) joins after B's step 1."""
    following = SCHEDULER_NAMES[(SCHEDULER_NAMES.index(scheduler) + 1) % len(SCHEDULER_NAMES)]
    a = make_job(text, dataclasses.replace(BASE, scheduler=scheduler, num_inference_steps=7, seed=1))
    b_params = dataclasses.replace(
        BASE,
        scheduler=following,
        num_inference_steps=5,
        seed=2,
        num_images=2,
        guidance_scale=3.0,
        identitynet_strength=0.5,
        adapter_strength=1.1,
        control_guidance_start=0.2,
        control_guidance_end=0.8,
        enhance_face_region=False,
    )
    b = make_job(text, b_params, seed=1, keypoints=OTHER_KEYPOINTS)
    c = make_job(text, dataclasses.replace(BASE, scheduler=scheduler, num_inference_steps=4, seed=3, guidance_scale=0))
    scenario = Scenario(batcher())
    g = group(denoiser)
    scenario.add("b", b, g, after=("a", 3))
    scenario.add("c", c, g, after=("b", 1))
    scenario.add("a", a, g)
    outcomes = scenario.results()
    assert_like_alone(denoiser, {"a": a, "b": b, "c": c}, outcomes)
    # B joined right after A's step 3 and C after B's step 1: B's first step shared A's 4th forward, C's first
    # step the forward of A's 5th and B's 2nd (a forward reports its jobs in the order they were admitted).
    order = scenario.steps
    joined = [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 1), ("a", 5), ("b", 2), ("c", 1)]
    assert order[: len(joined)] == joined
    for name, outcome in outcomes.items():  # one forward per scheduler timestep (second-order ones take two)
        assert outcome.stats.forwards == len([n for n, _ in order if n == name]) > 0
    assert outcomes["a"].stats.most_jobs == 3 and outcomes["a"].stats.most_rows == 2 + 4 + 1
    assert outcomes["c"].stats.run == outcomes["a"].stats.run  # the group never emptied: one run


def test_img2img_and_extra_controlnets_with_other_windows_join_mid_way(controlled_denoiser, text, batcher) -> None:
    """Jobs with the same extra ControlNet (other strengths and windows), an image-to-image start and other step
    counts share forwards; the ControlNet's per-row window follows each job's own step count."""
    maps = sample_control_maps(64)
    flipped = {"canny": np.ascontiguousarray(maps["canny"][:, ::-1])}
    canny = dataclasses.replace(BASE, num_inference_steps=8, controlnets=(ControlSetting("canny", 0.8),))
    a = make_job(text, canny, control_maps={"canny": maps["canny"]})
    b_params = dataclasses.replace(
        canny,
        seed=11,
        num_inference_steps=10,
        strength=0.6,
        scheduler="euler_a",
        controlnets=(ControlSetting("canny", 0.4, start=0.3, end=0.9),),
    )
    b = make_job(text, b_params, seed=2, control_maps=flipped, init_image=sample_init_image(64))
    c_params = dataclasses.replace(canny, seed=12, num_inference_steps=3, controlnets=(ControlSetting("canny", 1.2),))
    c = make_job(text, c_params, seed=3, control_maps={"canny": maps["canny"]})
    scenario = Scenario(batcher())
    g = group(controlled_denoiser)
    scenario.add("b", b, g, after=("a", 2))
    scenario.add("c", c, g, after=("b", 2))
    scenario.add("a", a, g)
    outcomes = scenario.results()
    assert_like_alone(controlled_denoiser, {"a": a, "b": b, "c": c}, outcomes)
    assert outcomes["b"].stats.forwards == b_params.denoising_steps == 6  # image-to-image runs only its last 6
    assert outcomes["c"].stats.most_jobs == 3


def test_jobs_that_cannot_share_a_forward_take_turns_in_runs_of_steps(denoiser, text, batcher) -> None:
    """Two groups (other sizes): the turn passes every ``turn_steps`` steps to the group holding the oldest job,
    and each job still gives its alone image."""
    small = make_job(text, dataclasses.replace(BASE, num_inference_steps=6))
    large = make_job(text, dataclasses.replace(BASE, width=96, num_inference_steps=5, seed=4))
    scenario = Scenario(batcher(turn_steps=2))
    scenario.add("small", small, group(denoiser, "64"))
    scenario.add("large", large, group(denoiser, "96"))
    outcomes = scenario.results()
    assert_like_alone(denoiser, {"small": small, "large": large}, outcomes)
    who = [name for name, _ in scenario.steps]
    assert who == ["small"] * 2 + ["large"] * 2 + ["small"] * 2 + ["large"] * 2 + ["small"] * 2 + ["large"]
    assert outcomes["small"].stats.run != outcomes["large"].stats.run


def test_admission_is_oldest_first_within_the_row_limit(denoiser, text, batcher) -> None:
    """Limit 6 rows: A (2 rows) and B (4 rows) run; C (4 rows) waits, and D (2 rows, would fit) must not overtake
    C; C is admitted when A ends, D when B ends."""
    cfg = dataclasses.replace(BASE, num_inference_steps=4)
    a = make_job(text, cfg)
    b = make_job(text, dataclasses.replace(cfg, num_images=2, num_inference_steps=6, seed=2))
    c = make_job(text, dataclasses.replace(cfg, num_images=2, seed=3))
    d = make_job(text, dataclasses.replace(cfg, seed=4))
    assert [j.params.unet_rows for j in (a, b, c, d)] == [2, 4, 4, 2]
    scenario = Scenario(batcher(max_rows=6))
    g = group(denoiser)
    scenario.add("c", c, g, after=("a", 1))
    scenario.add("d", d, g, after=("a", 2))
    scenario.add("a", a, g)
    scenario.add("b", b, g)
    outcomes = scenario.results()
    order = scenario.steps
    assert order.index(("c", 1)) > order.index(("a", 4))  # C waited for A's rows
    assert order.index(("d", 1)) > order.index(("b", 6))  # D queued behind C, not beside A and B
    assert max(o.stats.most_rows for o in outcomes.values()) <= 6
    assert_like_alone(denoiser, {"c": c, "d": d}, outcomes)


def test_a_cancelled_or_dropped_job_leaves_at_a_step_boundary_and_the_others_go_on(denoiser, text, batcher) -> None:
    a = make_job(text, dataclasses.replace(BASE, num_inference_steps=6))
    b = make_job(text, dataclasses.replace(BASE, num_inference_steps=6, seed=5))
    c = make_job(text, dataclasses.replace(BASE, num_inference_steps=6, seed=6))
    scenario = Scenario(batcher())
    g = group(denoiser)
    scenario.add("a", a, g)
    scenario.add("b", b, g, drop_at=2)  # its on_step says stop (an async job cancelled through its channel)
    scenario.add("c", c, g)
    scenario.cancels["c"]()  # cancelled before it ran
    outcomes = scenario.results()
    assert outcomes["b"].images is None and outcomes["c"].images is None
    assert [s for name, s in scenario.steps if name == "b"] == [1, 2]
    assert not [s for name, s in scenario.steps if name == "c"]
    assert_like_alone(denoiser, {"a": a}, outcomes)
    assert b._state == {} and c._state == {}  # nothing of theirs is kept


def test_a_job_that_cannot_start_fails_alone(denoiser, text, batcher) -> None:
    good = make_job(text, BASE)
    bad = make_job(text, dataclasses.replace(BASE, strength=0.5))  # image-to-image without an init image
    scenario = Scenario(batcher())
    g = group(denoiser)
    scenario.add("good", good, g)
    scenario.add("bad", bad, g)
    with pytest.raises(InvalidParameterError, match="init image"):
        scenario.futures["bad"].result(60)
    assert scenario.futures["good"].result(60).images is not None


def test_a_failing_forward_fails_its_jobs_and_the_batcher_goes_on(denoiser, text, batcher) -> None:
    broken = {"on": True}

    @contextmanager
    def enter():
        if broken["on"]:
            broken["on"] = False
            raise RuntimeError("device lost")
        yield 0.0

    runner = batcher()
    first, _ = runner.submit(make_job(text, BASE), StepGroup("g", denoiser, enter))
    with pytest.raises(RuntimeError, match="device lost"):
        first.result(60)
    second, _ = runner.submit(make_job(text, BASE), StepGroup("g", denoiser, enter))
    assert second.result(60).images is not None
    assert runner.load() == {"waiting": 0, "running": 0, "rows": 0}
    assert runner.alive  # the failure did not stop the worker
    runner.close()
    assert not runner.alive
    with pytest.raises(RuntimeError, match="closed"):
        runner.submit(make_job(text, BASE), StepGroup("g", denoiser, enter))


def test_text_and_face_projections_are_made_once_per_job_while_others_join_and_leave(denoiser, text, batcher) -> None:
    """The K/V projections of a job's text and face tokens are computed when it first steps and kept while the set
    of rows around it changes: a cross-attention layer's ``to_k`` (text) and ``to_k_ip`` (face) see each job's rows
    exactly once, never the whole batch again."""
    name, layer = next((n, m) for n, m in denoiser.unet.named_modules() if n.endswith("attn2"))
    processor = denoiser.unet.attn_processors[f"{name}.processor"]
    seen: dict[str, list[int]] = {"text": [], "face": []}
    hooks = [
        layer.to_k.register_forward_hook(lambda _m, args, _o: seen["text"].append(args[0].shape[0])),
        processor.to_k_ip.register_forward_hook(lambda _m, args, _o: seen["face"].append(args[0].shape[0])),
    ]
    try:
        a = make_job(text, dataclasses.replace(BASE, num_inference_steps=6))
        b = make_job(text, dataclasses.replace(BASE, num_inference_steps=3, num_images=2, seed=2))
        c = make_job(text, dataclasses.replace(BASE, num_inference_steps=3, seed=3, guidance_scale=0))
        scenario = Scenario(batcher())
        g = group(denoiser)
        scenario.add("b", b, g, after=("a", 1))  # joins, then leaves after its 3 steps
        scenario.add("c", c, g, after=("b", 3))  # joins the set A and B made, after B left
        scenario.add("a", a, g)
        scenario.results()
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"text": [2, 4, 1], "face": [2, 4, 1]}  # A's 2 rows, B's 4 (2 images, CFG), C's 1 (no CFG)
