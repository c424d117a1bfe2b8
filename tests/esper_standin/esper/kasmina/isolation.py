"""Stand-in for esper.kasmina.isolation."""

from esper.kasmina.blend_ops import blend_add


def ste_forward(host_features, seed_features):
    s = seed_features.to(host_features.dtype)
    return host_features + (s - s.detach())


def blend_with_isolation(host_features, seed_features, alpha):
    return blend_add(host_features, seed_features, alpha)


class GradientHealthMonitor:  # bookkeeping Esper keeps; not a blend
    pass
