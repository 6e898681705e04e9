"""Deterministic synthetic catalog and event log whose users' interests drift between topics."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone

from chronorec.client.rules import SECONDS_PER_DAY as DAY
from chronorec.server.core.catalog import Event, Item

# Per topic: subjects, title templates and text templates. Every phrase is built from the
# topic's own vocabulary so that a sentence encoder separates the topics clearly.
_VOCABULARY: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "subjects": [
            "sourdough bread", "tomato risotto", "garlic roast chicken", "lemon tart", "vegetable curry",
            "homemade pasta", "beef stew", "miso soup", "chocolate cake", "grilled salmon", "fluffy pancakes",
            "seafood paella", "pork dumplings", "ratatouille",
        ],
        "titles": [
            "How to cook {s} at home", "The perfect {s} recipe", "{s} in thirty minutes", "A chef's guide to {s}",
            "Weeknight {s} for beginner cooks", "Secrets of classic {s}", "{s}: kitchen tips and tricks",
        ],
        "texts": [
            "A step-by-step recipe for {s} with ingredients, oven temperatures and cooking times.",
            "Learn to season, chop and simmer {s} like a chef in your own kitchen.",
            "Our test kitchen shares the spices, sauces and pans that make {s} taste great.",
            "Serve {s} for dinner; the recipe feeds four and leftovers keep for two days.",
            "Bake, roast or fry: three ways to prepare {s} with simple pantry ingredients.",
        ],
    },
    "astronomy": {
        "subjects": [
            "the Andromeda galaxy", "the moons of Jupiter", "black holes", "the Orion nebula", "a total solar eclipse",
            "the rings of Saturn", "exoplanets", "the Perseid meteor shower", "neutron stars", "the Milky Way",
            "the James Webb space telescope", "dark matter", "the planet Mars", "comets",
        ],
        "titles": [
            "Observing {s} through a backyard telescope", "What astronomers learned about {s}",
            "A stargazer's guide to {s}", "The astrophysics of {s}", "{s} explained by an astronomer",
            "Photographing {s} in the night sky",
        ],
        "texts": [
            "Astronomers study {s} with telescopes, spectra and orbital measurements.",
            "A clear dark sky, a star chart and patience are all you need to see {s}.",
            "New observations of {s} change what we know about stars, galaxies and the universe.",
            "Light from {s} travels across space for years before it reaches our telescopes.",
            "The gravity, orbits and cosmic history behind {s}, explained for amateur stargazers.",
        ],
    },
    "football": {
        "subjects": [
            "the Champions League final", "penalty shootouts", "the offside rule", "a title-deciding derby",
            "the World Cup qualifiers", "goalkeeper training", "counter-attacking tactics", "the transfer window",
            "a last-minute winning goal", "youth football academies", "high pressing", "set-piece corners",
        ],
        "titles": [
            "Match report: {s}", "Tactics board: {s}", "Why {s} decides football seasons", "Inside {s}",
            "Football analysis of {s}", "{s}: what the coaches and players say",
        ],
        "texts": [
            "The striker, the midfield and the defence: how {s} shaped the match.",
            "Coaches explain {s}, from the training ground to the stadium on match day.",
            "Fans in the stadium saw goals, fouls and a red card as {s} unfolded.",
            "The league table, the referee's decisions and {s} after ninety minutes of football.",
            "Player ratings, formations and passing maps tell the story of {s}.",
        ],
    },
    "jazz": {
        "subjects": [
            "bebop saxophone solos", "Miles Davis' Kind of Blue", "swing big bands", "jazz piano voicings",
            "improvisation over blues changes", "the trumpet in modern jazz", "New Orleans brass bands",
            "walking bass lines", "John Coltrane's A Love Supreme", "jazz standards", "the Blue Note records era",
            "late-night jazz club sessions",
        ],
        "titles": [
            "Listening guide: {s}", "The history of {s}", "Learning {s} by ear", "A night of {s}",
            "Why {s} still swings", "Jazz masterclass on {s}",
        ],
        "texts": [
            "The saxophone, the trumpet and the rhythm section bring {s} to life on record and on stage.",
            "Musicians improvise chords, melodies and solos in {s}, the sound of classic jazz.",
            "A listening session on {s}: the albums, the players and the swing of the band.",
            "From smoky clubs to concert halls, {s} shaped how jazz musicians play together.",
            "Learn the scales, harmony and rhythm that jazz players use in {s}.",
        ],
    },
    "programming": {
        "subjects": [
            "Python generators", "Rust ownership", "unit testing", "async I/O", "SQL query optimization",
            "Git branching", "type hints", "memory leaks", "REST API design", "concurrency bugs",
            "refactoring legacy code", "compiler internals",
        ],
        "titles": [
            "A practical guide to {s}", "Debugging {s}", "{s} for software engineers",
            "Understanding {s} in production code", "Common mistakes with {s}", "Programming tutorial: {s}",
        ],
        "texts": [
            "Code examples show how {s} works, with functions, classes and tests you can run.",
            "Software developers explain {s}: the compiler, the runtime and the bugs to avoid.",
            "Write cleaner programs: {s} with source code, benchmarks and a debugger session.",
            "A programming deep dive into {s} for backend engineers and open source maintainers.",
            "From the terminal to the pull request: {s} in a real software project.",
        ],
    },
    "gardening": {
        "subjects": [
            "tomato seedlings", "composting", "pruning roses", "raised vegetable beds", "growing herbs on a balcony",
            "spring flower bulbs", "organic pest control", "lawn care", "fruit trees", "watering in summer",
            "houseplants", "saving seeds",
        ],
        "titles": [
            "Gardening basics: {s}", "A season of {s}", "Tips for {s} in your garden", "The gardener's guide to {s}",
            "{s} without chemicals", "Getting your hands dirty: {s}",
        ],
        "texts": [
            "Soil, sunlight and water: how gardeners succeed with {s} in the vegetable patch.",
            "Plant, prune and mulch: a gardening calendar for {s} through the seasons.",
            "Healthy roots, green leaves and flowers in bloom start with {s}.",
            "Grab a spade and a watering can; {s} is easier than most gardeners think.",
            "Compost, seeds and garden beds: a practical guide to {s} for new growers.",
        ],
    },
    "finance": {
        "subjects": [
            "index funds", "retirement savings", "interest rates", "the housing market", "stock market volatility",
            "household budgeting", "inflation", "bond yields", "paying off debt", "emergency funds",
            "dividend investing", "tax-efficient saving",
        ],
        "titles": [
            "Personal finance: {s}", "What {s} means for your money", "An investor's guide to {s}",
            "The economics of {s}", "{s} explained for savers", "Markets weekly: {s}",
        ],
        "texts": [
            "Money, savings and investment returns: what {s} means for your portfolio.",
            "Economists and financial advisers explain {s}, from the central bank to your bank account.",
            "Stocks, bonds and cash: how {s} affects investors, savers and borrowers.",
            "A budget spreadsheet and a long-term plan make {s} less stressful for your finances.",
            "Prices, wages and markets: the financial news behind {s} this quarter.",
        ],
    },
    "travel": {
        "subjects": [
            "the temples of Kyoto", "a road trip through Iceland", "the Amalfi coast", "backpacking in Patagonia",
            "the old town of Lisbon", "a safari in Kenya", "island hopping in Greece", "the night trains of Europe",
            "the markets of Marrakech", "hiking in the Alps", "street food in Bangkok", "the fjords of New Zealand",
        ],
        "titles": [
            "Travel guide: {s}", "Seven days exploring {s}", "A budget trip to {s}", "Where to stay near {s}",
            "Postcards from {s}", "Planning a holiday around {s}",
        ],
        "texts": [
            "Flights, hotels and local sights: a travel itinerary for {s}.",
            "Pack your bags: tourists and backpackers share their holiday tips for {s}.",
            "The best season to visit, where to sleep and what to eat on a trip to {s}.",
            "A travel writer's journey to {s}, with maps, beaches, mountains and city walks.",
            "Passport, train tickets and a camera: how to plan a vacation around {s}.",
        ],
    },
}

TOPICS: tuple[str, ...] = tuple(_VOCABULARY)
DEMO_WINDOW_DAYS = 120

_ON_TOPIC_ACTIONS = (("view", 40), ("click", 22), ("like", 12), ("rating", 10),
                     ("add_to_cart", 5), ("purchase", 4), ("share", 4), ("skip", 3))
_NOISE_ACTIONS = (("view", 45), ("click", 15), ("skip", 25), ("dislike", 10), ("rating", 5))


@dataclass(frozen=True)
class UserDrift:
    """The ground truth of one synthetic user: interest in topic_before until switch_at, then topic_after."""

    user_id: str
    topic_before: str
    topic_after: str
    switch_at: float

    def topic_at(self, t: float) -> str:
        return self.topic_before if t < self.switch_at else self.topic_after


@dataclass(frozen=True)
class DriftDataset:
    items: list[Item]
    events: list[Event]
    users: list[UserDrift]
    anchor: float
    window_start: float


def today_utc_midnight() -> float:
    now = datetime.now(timezone.utc)
    return datetime(now.year, now.month, now.day, tzinfo=timezone.utc).timestamp()


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _weighted(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([a for a, _ in table], weights=[w for _, w in table])[0]


def _make_items(rng: random.Random, n_items: int, topics: tuple[str, ...], anchor: float, window_start: float,
                prefix: str, evergreen_fraction: float, expiring_fraction: float, future_fraction: float
                ) -> tuple[list[Item], dict[str, float]]:
    # Every (subject, template) pair of a topic is used once before any repeats, in a
    # seeded order; repeats get a part number so titles stay unique.
    pairs = {}
    for topic in topics:
        vocab = _VOCABULARY[topic]
        topic_pairs = [(s, t) for s in vocab["subjects"] for t in vocab["titles"]]
        rng.shuffle(topic_pairs)
        pairs[topic] = topic_pairs
    items: list[Item] = []
    popularity: dict[str, float] = {}
    window = anchor - window_start
    for i in range(n_items):
        topic = topics[i % len(topics)]
        vocab = _VOCABULARY[topic]
        k = i // len(topics)
        subject, template = pairs[topic][k % len(pairs[topic])]
        title = _capitalised(template.format(s=subject))
        if k >= len(pairs[topic]):
            title += f" (part {k // len(pairs[topic]) + 1})"
        text = " ".join(_capitalised(t.format(s=subject)) for t in rng.sample(vocab["texts"], 2))
        roll = rng.random()
        if roll < future_fraction:
            published_at: float | None = anchor + round(rng.uniform(1, 21) * DAY)
        elif roll < future_fraction + evergreen_fraction:
            published_at = None
        else:
            published_at = float(round(window_start + rng.uniform(0.0, 0.98) * window))
        expires_at = None
        if published_at is not None and rng.random() < expiring_fraction:
            expires_at = published_at + round(rng.uniform(10, 60) * DAY)
        item_id = f"{prefix}-{i + 1:04d}"
        items.append(Item(item_id=item_id, title=title, text=text, category=topic,
                          published_at=published_at, expires_at=expires_at,
                          attributes={"topic": topic, "source": "chronorec synthetic demo"}))
        # Heavy-tailed appeal: a few items draw most of the traffic, as in real catalogs.
        popularity[item_id] = rng.lognormvariate(0.0, 1.0)
    return items, popularity


def generate_drift_dataset(seed: int = 7, n_items: int = 360, n_users: int = 60, n_events_per_user: int = 40,
                           anchor: float | None = None, *, window_days: float = DEMO_WINDOW_DAYS,
                           topics: tuple[str, ...] = TOPICS, noise: float = 0.1,
                           evergreen_fraction: float = 0.08, expiring_fraction: float = 0.2,
                           future_fraction: float = 0.03, freshness_half_life_days: float = 10.0,
                           prefix: str = "demo") -> DriftDataset:
    """A catalog over `topics` and users whose interest moves from one topic to another.

    Everything lies in the `window_days` before `anchor` (default today 00:00 UTC), except
    the few items published after it (`future_fraction`). Each user acts on about
    `n_events_per_user` items (0.5x to 1.5x), each one available at the event's time and
    new to the user: with probability 1 - `noise` from the topic of the moment (chosen by
    appeal x freshness), else from another topic with weaker actions. Same arguments,
    same output.
    """
    unknown = [t for t in topics if t not in _VOCABULARY]
    if unknown or len(topics) < 2:
        raise ValueError(f"topics must be at least two of {', '.join(TOPICS)}")
    anchor = float(today_utc_midnight() if anchor is None else anchor)
    window_start = anchor - window_days * DAY
    rng = random.Random(seed)
    items, popularity = _make_items(rng, n_items, topics, anchor, window_start, prefix,
                                    evergreen_fraction, expiring_fraction, future_fraction)
    by_topic: dict[str, list[Item]] = {t: [it for it in items if it.category == t] for t in topics}
    half_life = freshness_half_life_days * DAY

    def appeal(item: Item, t: float) -> float:
        # Fresh items draw more attention; evergreen ones a steady share.
        age_factor = 0.3 if item.published_at is None else 0.15 + 2.0 ** (-(t - item.published_at) / half_life)
        return popularity[item.item_id] * age_factor

    users: list[UserDrift] = []
    events: list[Event] = []
    for u in range(n_users):
        user_id = f"{prefix}-user-{u + 1:03d}"
        before, after = rng.sample(topics, 2)
        switch_at = float(round(window_start + rng.uniform(0.35, 0.8) * (anchor - window_start)))
        users.append(UserDrift(user_id, before, after, switch_at))
        n_events = max(3, round(n_events_per_user * rng.uniform(0.5, 1.5)))
        times = sorted(round(window_start + rng.uniform(0.04, 1.0) * (anchor - window_start - 60)) for _ in range(n_events))
        seen: set[str] = set()
        for k, t in enumerate(times):
            on_topic = rng.random() >= noise
            topic = before if t < switch_at else after
            if not on_topic:
                topic = rng.choice([x for x in topics if x != topic])
            candidates = [it for it in by_topic[topic] if it.item_id not in seen and it.available_at(t)]
            if not candidates:
                continue
            item = rng.choices(candidates, weights=[appeal(it, t) for it in candidates])[0]
            seen.add(item.item_id)
            action = _weighted(rng, _ON_TOPIC_ACTIONS if on_topic else _NOISE_ACTIONS)
            value = None
            if action == "rating":
                value = float(rng.choice((3, 4, 4, 5, 5)) if on_topic else rng.choice((1, 2, 2, 3)))
            events.append(Event(event_id=f"{user_id}-{k + 1:04d}", user_id=user_id, item_id=item.item_id, action=action,
                                timestamp=float(t), value=value))
    # A log arrives in time order; ties keep generation order (sorted is stable).
    events.sort(key=lambda e: e.timestamp)
    return DriftDataset(items=items, events=events, users=users, anchor=anchor, window_start=window_start)


def generate_demo(seed: int = 7, anchor: float | None = None, n_items: int = 360,
                  n_users: int = 60) -> tuple[list[Item], list[Event]]:
    """The demo catalog the server can load on first start: items and events of the 120
    days before `anchor` (default today 00:00 UTC)."""
    data = generate_drift_dataset(seed=seed, n_items=n_items, n_users=n_users, anchor=anchor)
    return data.items, data.events


def ensure_demo(store, anchor: float | None = None) -> bool:
    """Load the demo into `store` (an EventStore) when it has no items; False when it had some."""
    if store.count_items() > 0:
        return False
    items, events = generate_demo(anchor=anchor)
    store.bulk_import(items, events)
    return True
