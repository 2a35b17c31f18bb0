"""checksums.json of a distributed save (each rank hashes the files it wrote) and a collective
verify (files split over the ranks): every rank raises the same error for one damaged file."""

import json

from test_gpt_dist import _build


def case_save(path):
    import torch.distributed as dist

    from maskllm_megatron.checkpoint import integrity
    from maskllm_megatron.checkpoint.model import save_model

    model, _ = _build(glu=True, query_groups=4)
    hashed = []
    real = integrity.file_digest
    integrity.file_digest = lambda p: hashed.append(p.name) or real(p)
    try:
        save_model(model, path)
    finally:
        integrity.file_digest = real
    return dist.get_rank(), sorted(hashed)


def case_verify(path):
    from maskllm_megatron.checkpoint.integrity import verify
    from maskllm_megatron.errors import CheckpointError

    try:
        verify(path, collective=True)
    except CheckpointError as err:
        return str(err)
    return None


def test_a_tp2_save_is_sealed_by_every_rank_and_verified_together(dist4, tmp_path):
    from maskllm_megatron.checkpoint.integrity import MANIFEST, file_digest

    path = tmp_path / "ckpt"
    hashed = dict(dist4.run(case_save, str(path), tp=2))
    # each rank hashed its own shard file; rank 0 also the files only it wrote
    for rank in range(1, 4):
        assert hashed[rank] == [f"__{rank}_0.distcp"], hashed
    assert {"__0_0.distcp", ".metadata", "common.pt", "metadata.json", "maskllm.json"} <= \
        set(hashed[0])
    files = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    assert sorted(files) == on_disk  # the manifest equals the files hashed in one process
    for name, entry in files.items():
        assert entry == {"size": (path / name).stat().st_size, "sha256": file_digest(path / name)}
    assert dist4.run(case_verify, str(path), tp=2) == [None] * 4
    names = sorted(files)
    damaged = [i for i, n in enumerate(names) if i % 4 and files[n]["size"]][:2]  # not rank 0's
    assert "__1_0.distcp" in [names[i] for i in damaged]
    for index in damaged:
        target = path / names[index]
        original = target.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 4
        target.write_bytes(bytes(data))
        messages = dist4.run(case_verify, str(path), tp=2)
        target.write_bytes(original)
        # checked on rank index % 4, raised on all of them alike
        assert len(set(messages)) == 1 and f"{names[index]} is corrupted" in messages[0]
    (path / names[0]).write_bytes(b"")
    assert all("truncated" in m for m in dist4.run(case_verify, str(path), tp=1))
