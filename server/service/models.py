"""ModelService: serving status, versions, activation and rollback."""

from __future__ import annotations

import dataclasses
import re

from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.service.convert import to_timestamp
from chronorec.server.service.errors import rpc
from chronorec.v1 import models_pb2, models_pb2_grpc

# A version is one directory name in the repository: no separators, no "..", no hidden names.
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, engine: ChronorecEngine):
        self.engine = engine

    @rpc
    def GetStatus(self, request, context):
        status = self.engine.status()
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
        )
        if status.loaded_at is not None:
            response.loaded_at.CopyFrom(to_timestamp(status.loaded_at))
        return response

    @rpc
    def ListVersions(self, request, context):
        return models_pb2.ListVersionsResponse(
            versions=[models_pb2.ModelVersion(**dataclasses.asdict(v)) for v in self.engine.list_versions()]
        )

    @rpc
    def ActivateVersion(self, request, context):
        if not request.version:
            raise InvalidArgument("version is empty")
        if not _VERSION_NAME.fullmatch(request.version) or ".." in request.version:
            raise InvalidArgument("version must be a version name (letters, digits, '.', '_', '-'; at most 128)")
        serving = self.engine.activate(request.version, wait=request.wait)
        return models_pb2.ActivateVersionResponse(serving_version=serving)

    @rpc
    def Rollback(self, request, context):
        active, serving = self.engine.rollback(wait=request.wait)
        return models_pb2.RollbackResponse(active_version=active, serving_version=serving)
