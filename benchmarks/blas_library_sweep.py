"""Whether cuBLASLt picks faster kernels than cuBLAS for the decode step's GEMMs past small_gemm's rows:
each model's layer GEMMs of one step (small_gemm_sweep.model_step with cuBLAS, captured in one CUDA
graph) under each of torch's BLAS library choices, at the row counts of large decode batches and of
prefill chunks. A development tool for a GPU: `python benchmarks/blas_library_sweep.py [--json OUT]`.
"""

import argparse
import json

import torch

from small_gemm_sweep import MODELS, model_step, model_weights

ROWS = (65, 96, 128, 192, 256, 512, 2048, 8192)
LIBRARIES = ("default", "cublas", "cublaslt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "us": {}}
    print("A decode step's layer GEMMs (cuBLAS path, SiLU-and-mul apart), us, by BLAS library: "
          + "  ".join(LIBRARIES))
    for name in MODELS:
        weights = model_weights(name)
        for m in ROWS:
            us = {}
            for library in LIBRARIES:
                torch.backends.cuda.preferred_blas_library(library)
                us[library] = model_step(weights, m, ours=False)
            out["us"][f"{name} M={m}"] = us
            print(f"  {name:5} M={m:5}  " + "  ".join(f"{us[lib]:9.1f}" for lib in LIBRARIES)
                  + f"   cublaslt/cublas {us['cublaslt'] / us['cublas']:.3f}", flush=True)
        del weights
        torch.cuda.empty_cache()
    torch.backends.cuda.preferred_blas_library("default")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
