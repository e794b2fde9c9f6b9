"""Shard members that carry pickles (.pkl, .pth, .pyd) are never unpickled by the loader."""

import json
import os
import pickle

import numpy as np
import webdataset as wds

from stale.data.datamodule import VideoDataModule
from stale.data.synthetic import SyntheticSpec, make_clip
from stale.data.video_io import encode_mp4


class Payload:
    """Unpickling this creates the file `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_members_in_shards_are_never_loaded(tmp_path):
    spec = SyntheticSpec()
    rng = np.random.default_rng(0)
    marker = tmp_path / "payload-ran"
    evil = pickle.dumps(Payload(str(marker)))
    shard = tmp_path / "evil-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(8):
            sink.write(
                {
                    "__key__": f"clip{i:03d}",
                    "mp4": encode_mp4(make_clip(rng, spec, i % 4)),
                    "json": json.dumps({"label": i % 4}).encode(),
                    "pkl": evil,
                    "pth": evil,
                    "pyd": evil,
                }
            )
    dm = VideoDataModule(
        shards=str(shard), val_shards=str(shard), frames=8, size=16, batch_size=4, num_workers=0, shuffle_buffer=4
    )
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 16, 16) and y.tolist() != []
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 8
    assert not marker.exists()  # the loader read mp4 and json, never the pickles

    pickle.loads(evil)  # control: the payload is live, so the assertion above could have failed
    assert marker.exists()
