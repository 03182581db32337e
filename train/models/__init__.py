"""Models: the multi-task network (multitask.py), its GRU decoder (decoder.py), offline pretrained weights
(pretrained.py), a build-by-name registry (registry.py) and the torch-free `model:` config (config.py).

Nothing is re-exported here: importing the package must stay cheap, so that reading a config (config.py)
does not load torch and timm.
"""
