"""``protein_flow``: flow matching on protein backbones with Proteina's conventions (Geffner et al., ICLR 2025).

The data are structures (``data.path``: PDB/mmCIF files, :mod:`equiaudit.io.data_structures`),
read by default as Cα atoms in **nanometres** (``data.atoms: CA``, ``data.units: nm``: this
preset's ``data_defaults``), one sample per file, padded with ``mask``. Per sample, from the
seed and the sample's id only (as in ``flow_matching``, whose preparation this reuses):

* ``x1`` = the Cα coordinates centred on the valid residues;
* ``x0 ~ N(0, noise_scale² I)`` per residue slot, centred the same way (Proteina's noise is
  centred Gaussian noise in nm);
* ``x_t = (1 − t)·x0 + t·x1`` (``flow.time: noise_at_0``, Proteina's: noise at ``t = 0``);
* the target: the velocity ``x1 − x0`` (default) or ``x1`` (``flow.target: x1``, a model
  predicting the clean structure);
* ``t``: by default the study's fixed list :data:`PROTEINA_TIMES` = 0, .2, .4, .6, .8, .9,
  .95, .99 — every structure at every time with the same noise, one ``t`` row each in
  ``breakdown.csv``; ``flow.t: null`` draws ``t ~ U(0, 1)`` per sample instead.

The model is called as ``model(x_t, t, residue, mask)``: ``x_t`` ``(N, L, 3)`` (``point``),
``t`` ``(N,)``, ``residue`` ``(N, L)`` integer tokens (scalars; AlphaFold's order), ``mask``
``(N, L)``. A model that takes no residue types sets ``model.inputs: [x_t, t, mask]``.

Breakdowns (``breakdown.csv``): ``t`` (per fixed time), ``residue`` (per residue type, per-
residue heads), ``position`` (by the residue's index along its chain, in bins), ``length``
(by the number of residues of the structure), beside the built-in ones.
"""

from __future__ import annotations

import dataclasses

from equiaudit.tasks.base import SampleVariable, register_task
from equiaudit.tasks.flow_matching import FLOW_MATCHING

__all__ = ["PROTEINA_TIMES", "PROTEIN_FLOW"]

#: The fixed flow times of the study's protein measurements.
PROTEINA_TIMES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)

PROTEIN_FLOW = register_task(
    # Flow matching's preparation, heads and flow: options (one section, shared), on Cα with
    # residue tokens as the model's input and Proteina's fixed times by default.
    dataclasses.replace(
        FLOW_MATCHING,
        name="protein_flow",
        fields={"x_t": "point", "t": "scalar", "residue": "scalar"},
        inputs=("x_t", "t", "residue", "mask"),
        options={**FLOW_MATCHING.options, "t": list(PROTEINA_TIMES)},
        # t as flow matching's (its panel and rows); the structure's residue count (from the
        # reader's ``length``) as a per-sample split, not a panel of its own.
        variables=(*FLOW_MATCHING.variables, SampleVariable("length", "chain length", "number of residues", drawn=False)),
        data_defaults={"atoms": "CA", "units": "nm"},
    )
)
