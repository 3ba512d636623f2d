"""The torch backend's batch decode (loaders/batch_decode.py) and its decode thread (loaders/prefetch.py)
on CPU tensors: edge replication in the shared canvas, rejected images decoded on the host one by one, a
real CMYK JPEG, and the background thread's order, depth, errors and early stop. The CUDA stream
hand-over itself runs in the gpu-marked test of tests/test_loader_torch.py."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastrefine.errors import RunError
from fastrefine.loaders import batch_decode
from fastrefine.loaders.prefetch import prefetch

CPU = torch.device("cpu")


def _jpeg(pixels: np.ndarray, mode: str = "RGB") -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=95)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


# -- edges of images smaller than the canvas ----------------------------------------------------------

def test_small_image_in_a_large_canvas_keeps_its_bottom_and_right_edges():
    """A flat 200 image cropped whole beside a larger image: every output pixel stays 200 (the zero
    padding gave 191.85 on the last row)."""
    big = torch.full((3, 64, 80), 50, dtype=torch.uint8)
    small = torch.full((3, 20, 30), 200, dtype=torch.uint8)
    out = batch_decode.crop_resize([big, small], [(0, 0, 64, 80), (0, 0, 20, 30)], 16)
    assert float(out[1].min()) == pytest.approx(200, abs=1e-3) and float(out[1].max()) == pytest.approx(200, abs=1e-3)
    assert float(out[1, :, -1].mean()) == pytest.approx(200, abs=1e-3)      # the last row


def test_an_images_crop_does_not_depend_on_its_batch_mates():
    small = torch.from_numpy(_photo(21, 33, 1)).permute(2, 0, 1).contiguous()
    big = torch.from_numpy(_photo(70, 90, 2)).permute(2, 0, 1).contiguous()
    box = (5.5, 7.25, 15.5, 25.75)                          # reaches the bottom and right edges
    alone = batch_decode.crop_resize([small], [box], 12)
    mixed = batch_decode.crop_resize([big, small], [(0, 0, 70, 90), box], 12)
    torch.testing.assert_close(mixed[1], alone[0], rtol=0, atol=1e-4)


def test_pad_edges_repeats_the_last_row_and_column():
    img = torch.arange(6, dtype=torch.float32).view(1, 2, 3).expand(3, 2, 3)
    slot = torch.empty(3, 4, 5)
    batch_decode.pad_edges(slot, img)
    assert slot[0].tolist() == [[0, 1, 2, 2, 2], [3, 4, 5, 5, 5], [3, 4, 5, 5, 5], [3, 4, 5, 5, 5]]


# -- images the batched decoder rejects ------------------------------------------------------------

def test_an_image_the_device_decoder_rejects_is_decoded_on_the_host_and_the_batch_goes_on(monkeypatch):
    photos = [_photo(16 + i, 24, i) for i in range(5)]
    blobs = [_jpeg(p) for p in photos]
    bad = blobs[2]
    real_device, real_host = batch_decode.device_decode, batch_decode.host_decode
    device_calls, host_calls = [], []

    def rejecting(batch, device):              # nvJPEG on a CMYK file: the whole batched call fails
        device_calls.append(len(batch))
        if any(b is bad for b in batch):
            raise RuntimeError("Error while decoding JPEG images: nvjpeg rejected it")
        return real_device(batch, device)

    def host(blob):
        host_calls.append(blob)
        return real_host(blob)

    monkeypatch.setattr(batch_decode, "device_decode", rejecting)
    monkeypatch.setattr(batch_decode, "host_decode", host)
    out = batch_decode.decode_batch(blobs, CPU)
    assert device_calls == [5, 1, 1, 1, 1, 1]           # the batch, then each image alone
    assert len(host_calls) == 1 and host_calls[0] is bad  # only the rejected one goes to the host
    for img, blob in zip(out, blobs):
        assert torch.equal(img, real_host(blob))


def test_cmyk_jpeg_decodes_like_pil():
    pixels = _photo(20, 30, 4)
    blob = _jpeg(pixels, "CMYK")
    buf = bytes(blob.numpy())
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(buf)).convert("RGB"))).permute(2, 0, 1)
    rgb = _jpeg(pixels)
    out = batch_decode.decode_batch([rgb, blob], CPU)
    assert torch.equal(out[1], ref)


def test_an_image_no_decoder_reads_names_its_file():
    blobs = [_jpeg(_photo(8, 8, 0)), torch.frombuffer(bytearray(b"\xff\xd8\xff broken"), dtype=torch.uint8)]
    with pytest.raises(RunError, match="shard-7.tar:img2"):
        batch_decode.decode_batch(blobs, CPU, where=lambda i: f"shard-7.tar:img{i + 1}")


def test_host_to_on_the_cpu_is_a_plain_copy():
    t = torch.arange(4)
    assert torch.equal(batch_decode.host_to(t, CPU), t)


# -- the decode thread ---------------------------------------------------------------------------

def test_prefetch_keeps_order_and_runs_at_most_depth_ahead():
    made, taken = [], []

    def make(i):
        made.append(i)
        return torch.full((2,), i)

    lead = 0
    for x in prefetch(range(20), make, device=CPU, depth=2):
        time.sleep(0.01)                       # a slow consumer: the thread fills the queue and waits
        taken.append(int(x[0]))
        lead = max(lead, len(made) - len(taken))
    assert taken == list(range(20)) and made == list(range(20))
    assert lead <= 3                           # 2 queued + 1 being made


def test_prefetch_raises_the_threads_error_in_the_consumer():
    def make(i):
        if i == 3:
            raise RunError("shard-0.tar:img3: decode failed")
        return i
    got = []
    with pytest.raises(RunError, match="img3"):
        for x in prefetch(range(10), make, device=CPU):
            got.append(x)
    assert got == [0, 1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    before = {t for t in threading.enumerate() if t.name == "fastrefine-decode"}
    gen = prefetch(range(1000), lambda i: i, device=CPU, depth=3)
    assert [next(gen) for _ in range(5)] == [0, 1, 2, 3, 4]
    gen.close()
    assert {t for t in threading.enumerate() if t.name == "fastrefine-decode"} == before


# -- CUDA (tools/gpu_check.sh) --------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_batch_with_a_cmyk_jpeg_goes_on():
    """nvJPEG never decodes CMYK: that image alone is decoded on the CPU, the rest on the GPU."""
    cuda = torch.device("cuda")
    photos = [_photo(24 + i, 32, i) for i in range(4)]
    blobs = [_jpeg(p) for p in photos] + [_jpeg(_photo(20, 30, 9), "CMYK")]
    out = batch_decode.decode_batch(blobs, cuda)
    assert all(img.is_cuda and img.shape[0] == 3 for img in out)
    assert torch.equal(out[-1].cpu(), batch_decode.host_decode(blobs[-1]))
    for img, blob in zip(out[:-1], blobs[:-1]):   # nvJPEG vs libjpeg-turbo: rounding only
        assert float((img.cpu().float() - batch_decode.host_decode(blob).float()).abs().mean()) < 2


@pytest.mark.gpu
def test_cuda_prefetch_hands_over_intact_batches_while_training_frees_memory():
    """The decode thread's batches, read after the training stream has queued work that allocates and
    frees large blocks: every batch equals what the same code gives on the CPU."""
    cuda = torch.device("cuda")
    photos = [[_photo(40 + 3 * i + k, 56, 10 * i + k) for k in range(8)] for i in range(12)]
    blobs = [[_jpeg(p) for p in batch] for batch in photos]
    boxes = [(2.0, 3.0, 30.0, 40.0)] * 8

    def make(batch, device):
        images = batch_decode.decode_batch(batch, device)
        return batch_decode.crop_resize(images, boxes, 24)

    expected = [make(b, CPU) for b in blobs]
    for x, ref in zip(prefetch(blobs, lambda b: make(b, cuda), device=cuda, depth=2), expected):
        for _ in range(4):                     # busy training stream: allocate, compute, free
            a = torch.randn(2048, 2048, device=cuda)
            (a @ a).sum()
            del a
        assert float((x.cpu() - ref).abs().mean()) < 2
