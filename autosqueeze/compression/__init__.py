"""From a plan to a compressed model: the techniques (one module each, in the registry
``techniques.TECHNIQUES``), the codecs that pack weights into bits, the kernels a loaded layer
runs in, recovery (distillation after structural steps) and the size model (a layer's bytes per
plan, without compressing).
"""
