import torch

from sbir.data.datasets import (CategoryDataset, FineGrainedTripletDataset, Stroke5Dataset, load_image_set,
                                pair_index)
from sbir.data.format import open_dataset


def test_category_and_fine_grained_datasets(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    photos = load_image_set(ds, "photos", ["train"])
    sketches = load_image_set(ds, "sketches", ["train"], with_strokes=True)
    assert photos.images.shape[1:] == (3, 32, 32) and sketches.images.shape[1:] == (1, 32, 32)
    x, y = CategoryDataset(sketches)[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and isinstance(y, int)
    pairs = pair_index(sketches, photos)
    assert (pairs >= 0).all()  # every embedded sketch has its photo
    fg = FineGrainedTripletDataset(sketches, photos, seed=0)
    s, p, n = fg[3]
    assert s.shape == p.shape == n.shape == (3, 32, 32) and not torch.equal(p, n)


def test_stroke5_dataset_layout_and_skips(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    photos = load_image_set(ds, "photos", ["train"])
    sketches = load_image_set(ds, "sketches", ["train"], with_strokes=True)
    sketches.strokes[0] = None
    data = Stroke5Dataset(sketches, photos, max_len=40)
    assert data.skipped == {"no_strokes": 1, "no_photo": 0}
    assert len(data) == len(sketches) - 1
    photo, seq, length = data[0]
    assert seq.shape == (41, 5) and photo.shape == (3, 32, 32)
    assert torch.equal(seq[0], torch.tensor([0, 0, 1, 0, 0.0]))  # start token
    assert seq[int(length), 4] == 1  # the end row closes the sequence
