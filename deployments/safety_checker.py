"""SafetyChecker deployment (CPU): the safety check (``deployments/generation/safety_stage.py``) served by Ray.

Its own small deployment rather than part of the ResultStore: the check (tens of milliseconds of CPU per image, about
a quarter of encoding it as WebP: README, Benchmarks) runs beside the identity score while the store waits for both,
so it adds almost nothing to a request's latency, where inside the store it would add its time to the store's serial
encoding; only these replicas load onnxruntime and the model; and it scales with the images generated rather than
with S3 traffic. The ingress binds it only when the policy is not ``off``.
"""

from __future__ import annotations

from ray import serve as ray_serve

from deployments import metrics
from deployments.generation.messages import DenoiseResult, SafetyResult
from deployments.generation.safety_stage import SafetyStage
from deployments.instantid.safety import OpenNsfwClassifier, SafetyCheck, SafetyPolicy
from deployments.replica import replica_id


@ray_serve.deployment(name="SafetyChecker", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class SafetyCheckerDeployment(SafetyStage):
    def __init__(
        self, *, policy: SafetyPolicy, threshold: float, providers: list[str] | None, threads: int | None
    ) -> None:
        classifier = OpenNsfwClassifier(providers=providers, threads=threads)
        super().__init__(SafetyCheck(classifier, policy, threshold), replica=replica_id())

    def check(self, output: DenoiseResult) -> SafetyResult:
        result = super().check(output)
        metrics.record_safety(result.policy, [verdict.flagged for verdict in result.verdicts])
        return result
