"""Model families: a network of the field built from what its checkpoint stores, no adapter code.

The protocol and the registry are in :mod:`equiaudit.zoo.families.base` (read its docstring to
add a family); this package re-exports them. Family modules are imported lazily.
"""

from equiaudit.zoo.families.base import (  # noqa: F401
    FAMILY_MODULES,
    RECOGNITION_KINDS,
    FamilyDefaults,
    Opaque,
    Peek,
    Recognition,
    build,
    defaults,
    family,
    family_names,
    recognise,
)

__all__ = ["FAMILY_MODULES", "RECOGNITION_KINDS", "FamilyDefaults", "Opaque", "Peek", "Recognition", "build", "defaults",
           "family", "family_names", "recognise"]
