"""CatalogService: upsert, delete and read items; changes reach the index at once."""

from __future__ import annotations

from chronorec.server.config import Limits
from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.service.convert import check_id, item_from_proto, item_to_proto
from chronorec.server.service.errors import ensure_active, rpc
from chronorec.server.service.executors import Executors
from chronorec.v1 import catalog_pb2, catalog_pb2_grpc


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, engine: ChronorecEngine, limits: Limits, executors: Executors):
        self.engine = engine
        self.limits = limits
        self.work = executors

    def _items(self, request) -> list:
        if not request.items:
            raise InvalidArgument("items is empty")
        if len(request.items) > self.limits.max_upsert_batch:
            raise InvalidArgument(f"{len(request.items)} items exceed max_upsert_batch={self.limits.max_upsert_batch}")
        limits = self.limits
        for i, item in enumerate(request.items):
            if not item.title.strip():
                raise InvalidArgument(f"item {i}: title is empty")
            if len(item.attributes) > limits.max_item_attributes:
                raise InvalidArgument(
                    f"item {i}: {len(item.attributes)} attributes exceed max_item_attributes={limits.max_item_attributes}"
                )
            size = len(item.title) + len(item.text) + len(item.category)
            size += sum(len(key) + len(value) for key, value in item.attributes.items())
            if size > limits.max_text_chars:
                raise InvalidArgument(f"item {i}: its text and attributes exceed max_text_chars={limits.max_text_chars}")
        return [item_from_proto(m, i) for i, m in enumerate(request.items)]

    @rpc
    async def UpsertItems(self, request, context):
        # Encoding a large batch is the expensive part: skip it for a caller that already left.
        ensure_active(context)
        # Checking and converting 5,000 items takes tens of milliseconds: a pool thread's job,
        # not the event loop's.
        upserted, size = await self.work.compute.run(self._upsert, request)
        return catalog_pb2.UpsertItemsResponse(upserted=upserted, index_size=size)

    def _upsert(self, request) -> tuple[int, int]:
        return self.engine.upsert_items(self._items(request))

    @rpc
    async def DeleteItems(self, request, context):
        if not request.item_ids:
            raise InvalidArgument("item_ids is empty")
        if len(request.item_ids) > self.limits.max_upsert_batch:
            raise InvalidArgument(f"{len(request.item_ids)} ids exceed max_upsert_batch={self.limits.max_upsert_batch}")
        ids = [check_id(item_id, f"item_ids[{i}]") for i, item_id in enumerate(request.item_ids)]
        ensure_active(context)
        deleted, size = await self.work.store.run(self.engine.delete_items, ids)
        return catalog_pb2.DeleteItemsResponse(deleted=deleted, index_size=size)

    @rpc
    async def GetItem(self, request, context):
        item_id = check_id(request.item_id, "item_id")
        item = await self.work.compute.run(self.engine.get_item, item_id)
        return catalog_pb2.GetItemResponse(item=item_to_proto(item))
