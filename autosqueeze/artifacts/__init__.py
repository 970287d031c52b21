"""The file formats a compressed model ships as: the artifact (one safetensors file, the plan in
its JSON header, no pickle), and the exported forms (a torch.export program, an ONNX file with
ONNX Runtime's integer kernels and fused operators).
"""
