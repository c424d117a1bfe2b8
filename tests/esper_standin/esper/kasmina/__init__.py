"""Stand-in for esper.kasmina: the package re-exports GatedBlend, as a package may."""

from esper.kasmina.blending import GatedBlend  # noqa: F401
