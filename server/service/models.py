"""ModelService: serving status, versions, activation and rollback."""

from __future__ import annotations

import re

from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.errors import InvalidArgument
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
        serving = await self.work.store.run(self.engine.activate, request.version, request.wait)
        return models_pb2.ActivateVersionResponse(serving_version=serving)

    @rpc
    async def Rollback(self, request, context):
        active, serving = await self.work.store.run(self.engine.rollback, request.wait)
        return models_pb2.RollbackResponse(active_version=active, serving_version=serving)
