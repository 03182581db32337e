"""Procedural synthetic fundus photographs: the embedded default dataset (`python -m train.data.make_data`).

catalog (classes, prevalence, fellow-eye rules) -> anatomy + lesions + nuisance (painting) -> grammar
(diagnosis sentence) -> render (one eye) -> generate (patients, parallel rendering, dataset folder).

Nothing is re-exported here (SynthConfig is in config.py, generate/plan_jobs in generate.py): a
re-export made every module of the package import the package, which imported them back.
"""
