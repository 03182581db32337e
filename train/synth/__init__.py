"""Procedural synthetic fundus photographs: the embedded default dataset (`python -m train.make_data`).

catalog (classes, prevalence, fellow-eye rules) -> anatomy + lesions + nuisance (painting) -> grammar
(diagnosis sentence) -> render (one eye) -> generate (patients, parallel rendering, dataset folder).
"""

from train.synth.config import SynthConfig
from train.synth.generate import dataset_spec, generate, plan_jobs

__all__ = ["SynthConfig", "dataset_spec", "generate", "plan_jobs"]
