"""The plain reference use of ``ExpertCache`` the tests compare against: classify, then admit every miss
(no prefetch withdrawal, no host compute in between). It was ``ExpertCache.access_layer``; only tests
used it, so it lives here."""

from dataclasses import dataclass


@dataclass
class LayerAccess:
    outcomes: list  # (expert, slot, outcome) in access order
    stale: list  # LOADING prefetch slots whose target layer has passed unused


def access_layer(cache, layer, ids) -> LayerAccess:
    outcomes = cache.classify(layer, ids)
    stale = cache.stale_prefetches(layer)
    cache.admit_misses(outcomes)
    return LayerAccess([tuple(o) for o in outcomes], stale)
