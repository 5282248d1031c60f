import torch, cupy as cp, warnings
s = torch.cuda.Stream()
print("torch has __cuda_stream__:", hasattr(s, "__cuda_stream__"))
print("cupy Stream.from_external:", hasattr(cp.cuda.Stream, "from_external"))
try:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cs = cp.cuda.Stream.from_external(s)
    print("from_external ok", cs.ptr == s.cuda_stream)
except Exception as e:
    print("from_external failed", type(e), e)
