"""One module per op: the autograd Functions of the fused backends, beside the kernels they call."""
