"""ModelService: serving status, versions, activation and rollback."""

from __future__ import annotations

import re

from chronorec.server.core.canary import CanaryPolicy, CanaryState, check_percent
from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.core.online_metrics import Figures
from chronorec.server.service.convert import to_timestamp
from chronorec.server.service.errors import rpc
from chronorec.server.service.executors import Executors
from chronorec.v1 import models_pb2, models_pb2_grpc

# A version is one directory name in the repository: no separators, no "..", no hidden names.
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """Reads and swaps run on the store threads: they read the model repository from disk, and
    a swap waited for (wait=True) holds its thread until the new version serves."""

    def __init__(self, engine: ChronorecEngine, executors: Executors):
        self.engine = engine
        self.work = executors

    @rpc
    async def GetStatus(self, request, context):
        status = await self.work.store.run(self.engine.status)
        response = models_pb2.GetStatusResponse(
            serving_version=status.serving_version,
            manifest_json=status.manifest_json,
            providers=status.providers,
            swap_in_progress=status.swap_in_progress,
            swap_target=status.swap_target,
            last_error=status.last_error,
            index_size=status.index_size,
            metrics=status.metrics,
            swap_count=status.swap_count,
            online_metrics=[_online(version, figures) for version, figures in sorted(status.online.items())],
            loaded_versions=[
                models_pb2.LoadedVersion(version=v.version, role=v.role, memory_bytes=v.memory_bytes)
                for v in status.loaded_versions
            ],
            resident_memory_bytes=status.resident_memory_bytes,
            unattributed_feedback=status.unattributed_feedback,
            last_canary_outcome=status.last_canary_outcome,
            replicas=[
                models_pb2.ReplicaStatus(
                    name=r.name,
                    serving_version=r.serving_version,
                    applied_seq=r.applied_seq,
                    heartbeat_age_seconds=r.heartbeat_age_s,
                    this_replica=r.this_replica,
                )
                for r in status.replicas
            ],
            applied_seq=status.applied_seq,
        )
        if status.loaded_at is not None:
            response.loaded_at.CopyFrom(to_timestamp(status.loaded_at))
        if status.canary is not None:
            response.canary.CopyFrom(_canary(status.canary))
        return response

    @rpc
    async def ListVersions(self, request, context):
        versions = await self.work.store.run(self.engine.list_versions)
        return models_pb2.ListVersionsResponse(
            versions=[
                models_pb2.ModelVersion(
                    version=v.version,
                    parent_version=v.parent_version,
                    created_at=v.created_at,
                    metrics=v.metrics,
                    serving=v.serving,
                    active=v.active,
                    unusable_reason=v.unusable_reason,
                    online=_online(v.version, v.online) if v.online is not None else None,
                    canary=v.canary,
                )
                for v in versions
            ]
        )

    @rpc
    async def ActivateVersion(self, request, context):
        if not request.version:
            raise InvalidArgument("version is empty")
        if not _VERSION_NAME.fullmatch(request.version) or ".." in request.version:
            raise InvalidArgument("version must be a version name (letters, digits, '.', '_', '-'; at most 128)")
        if request.HasField("canary_percent"):
            percent = check_percent(request.canary_percent)
            policy = CanaryPolicy(int(request.canary_policy.min_impressions), float(request.canary_policy.max_ctr_drop))
            plan = await self.work.store.run(self.engine.start_canary, request.version, percent, policy)
            return models_pb2.ActivateVersionResponse(
                serving_version=self.engine.serving_version() or "", canary_version=plan.candidate, canary_percent=plan.percent
            )
        if request.HasField("canary_policy"):
            raise InvalidArgument("canary_policy needs canary_percent")
        serving = await self.work.store.run(self.engine.activate, request.version, request.wait)
        return models_pb2.ActivateVersionResponse(serving_version=serving)

    @rpc
    async def Rollback(self, request, context):
        active, serving = await self.work.store.run(self.engine.rollback, request.wait)
        return models_pb2.RollbackResponse(active_version=active, serving_version=serving)

    @rpc
    async def PromoteCanary(self, request, context):
        serving = await self.work.store.run(self.engine.promote_canary)
        return models_pb2.PromoteCanaryResponse(serving_version=serving)

    @rpc
    async def AbortCanary(self, request, context):
        aborted = await self.work.store.run(self.engine.abort_canary)
        return models_pb2.AbortCanaryResponse(serving_version=self.engine.serving_version() or "", aborted_version=aborted)


def _online(version: str, figures: Figures) -> models_pb2.OnlineMetrics:
    return models_pb2.OnlineMetrics(
        version=version,
        window_seconds=figures.seconds,
        impressions=figures.impressions,
        clicks=figures.clicks,
        ctr=figures.ctr,
        conversions=figures.conversions,
        conversion_rate=figures.conversion_rate,
        mrr=figures.mrr,
        clicks_with_position=figures.clicks_with_position,
    )


def _canary(state: CanaryState) -> models_pb2.CanaryStatus:
    plan = state.plan
    return models_pb2.CanaryStatus(
        candidate_version=plan.candidate,
        percent=plan.percent,
        started_at=to_timestamp(plan.started_at),
        policy=models_pb2.CanaryPolicy(min_impressions=plan.policy.min_impressions, max_ctr_drop=plan.policy.max_ctr_drop),
        candidate=_online(plan.candidate, state.candidate),
        current=_online(state.current_version, state.current),
        decision=f"{state.decision.action}: {state.decision.reason}",
    )
