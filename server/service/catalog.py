"""CatalogService: upsert, delete and read items; changes reach the index at once."""

from __future__ import annotations

from chronorec.server.config import Limits
from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.service.convert import item_from_proto, item_to_proto
from chronorec.server.service.errors import rpc
from chronorec.v1 import catalog_pb2, catalog_pb2_grpc


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, engine: ChronorecEngine, limits: Limits):
        self.engine = engine
        self.limits = limits

    @rpc
    def UpsertItems(self, request, context):
        if not request.items:
            raise InvalidArgument("items is empty")
        if len(request.items) > self.limits.max_upsert_batch:
            raise InvalidArgument(f"{len(request.items)} items exceed max_upsert_batch={self.limits.max_upsert_batch}")
        for i, item in enumerate(request.items):
            size = len(item.title) + len(item.text) + len(item.category)
            if size > self.limits.max_text_chars:
                raise InvalidArgument(f"item {i} (id {item.item_id!r}) text exceeds max_text_chars={self.limits.max_text_chars}")
        items = [item_from_proto(m, i) for i, m in enumerate(request.items)]
        upserted, size = self.engine.upsert_items(items)
        return catalog_pb2.UpsertItemsResponse(upserted=upserted, index_size=size)

    @rpc
    def DeleteItems(self, request, context):
        if not request.item_ids:
            raise InvalidArgument("item_ids is empty")
        if len(request.item_ids) > self.limits.max_upsert_batch:
            raise InvalidArgument(f"{len(request.item_ids)} ids exceed max_upsert_batch={self.limits.max_upsert_batch}")
        deleted, size = self.engine.delete_items(list(request.item_ids))
        return catalog_pb2.DeleteItemsResponse(deleted=deleted, index_size=size)

    @rpc
    def GetItem(self, request, context):
        return catalog_pb2.GetItemResponse(item=item_to_proto(self.engine.get_item(request.item_id)))
