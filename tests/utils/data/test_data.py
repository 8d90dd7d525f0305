from __future__ import annotations

import random

import numpy as np
import pytest

from utils.data.sampling import GroupedBatchSampler, SeededDataset


class Shapes:
    """A dataset stand-in with mmdet's `get_data_info` (width/height)."""

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def get_data_info(self, index: int) -> dict:
        width, height = self.sizes[index]
        return {"width": width, "height": height}

    def __getitem__(self, index: int) -> tuple[int, float, float]:
        return index, float(np.random.rand()), random.random()


SIZES = [(64, 48)] * 13 + [(48, 64)] * 8


def test_batches_cover_each_image_once_per_pass_grouped_by_orientation() -> None:
    sampler = GroupedBatchSampler(Shapes(SIZES), batch_size=4, seed=0)
    for _ in range(2):
        batches = list(sampler)
        assert len(batches) == len(sampler) == 6
        indices = [index for batch in batches for _, index in batch]
        assert sorted(indices) == list(range(len(SIZES)))
        # 13 landscape and 8 portrait images: 5 single-orientation batches, then the leftover.
        for batch in batches[:5]:
            assert len({SIZES[i][1] > SIZES[i][0] for _, i in batch}) == 1


def test_passes_differ_and_repeat_for_the_same_seed() -> None:
    first = GroupedBatchSampler(Shapes(SIZES), batch_size=4, seed=3)
    second = GroupedBatchSampler(Shapes(SIZES), batch_size=4, seed=3)
    pass_a, pass_b = list(first), list(first)
    assert pass_a != pass_b
    assert [pass_a, pass_b] == [list(second), list(second)]
    assert list(GroupedBatchSampler(Shapes(SIZES), batch_size=4, seed=4)) != pass_a


def test_seeded_dataset_is_a_function_of_seed_pass_and_index() -> None:
    dataset = SeededDataset(Shapes(SIZES), seed=0)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = dataset[(0, 5)]
    assert (np.random.get_state()[1] == before).all()  # global generators left as they were
    assert dataset[(0, 5)] == a
    assert dataset[(1, 5)] != a and dataset[(0, 6)][1:] != a[1:]
    assert SeededDataset(Shapes(SIZES), seed=1)[(0, 5)] != a


@pytest.mark.parametrize("skip", [0, 3, 6, 14])
def test_skip_resumes_the_repeated_stream(skip: int) -> None:
    def stream(sampler: GroupedBatchSampler, passes: int) -> list:
        return [batch for _ in range(passes) for batch in sampler]

    straight = stream(GroupedBatchSampler(Shapes(SIZES), batch_size=4, seed=0), 4)
    resumed = stream(GroupedBatchSampler(Shapes(SIZES), batch_size=4, seed=0, skip=skip), 2)
    assert resumed == straight[skip : skip + len(resumed)]
    assert len(resumed) == 12 - skip % 6


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_share_each_global_batch(replicas: int) -> None:
    """Round-robin dealing of the slices gives every step the single-process global batch."""
    single = GroupedBatchSampler(Shapes(SIZES), batch_size=2 * replicas, seed=0)
    sliced = GroupedBatchSampler(Shapes(SIZES), batch_size=2, seed=0, num_replicas=replicas)
    batches, slices = list(single), list(sliced)
    assert len(slices) == len(sliced) == len(batches) * replicas
    for step, batch in enumerate(batches):
        per_rank = slices[step * replicas : (step + 1) * replicas]
        assert len({len(s) for s in per_rank}) == 1  # equal slices, padded at the end
        merged = [key for s in per_rank for key in s]
        assert set(merged) == set(batch) and merged[: len(batch)] == batch


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_rank_takes_its_own_slice_of_every_global_batch(replicas: int) -> None:
    """Any engine's rank r: the slices Determined would deal it, resumes included."""
    dealt = GroupedBatchSampler(Shapes(SIZES), batch_size=2, seed=0, num_replicas=replicas)
    stream = list(dealt) + list(dealt)  # two passes
    for rank in range(replicas):
        own = GroupedBatchSampler(
            Shapes(SIZES), batch_size=2, seed=0, num_replicas=replicas, rank=rank
        )
        mine = list(own) + list(own)
        assert len(own) == len(dealt) // replicas
        assert mine == stream[rank::replicas]
        # Skipping 4 global batches on every rank is skipping 4 x replicas dealt slices.
        resumed = GroupedBatchSampler(
            Shapes(SIZES), batch_size=2, seed=0, num_replicas=replicas, rank=rank, skip=4
        )
        end = (4 // len(own) + 1) * len(own)  # a pass at a time: the rest of the fourth's
        assert list(resumed) == mine[4:end]
    with pytest.raises(ValueError, match="rank 3 is not in"):
        GroupedBatchSampler(Shapes(SIZES), batch_size=2, seed=0, num_replicas=3, rank=3)


@pytest.mark.parametrize("batch_size", [1, 5, 21, 30])
def test_length_is_ceil_of_size_over_batch(batch_size: int) -> None:
    sampler = GroupedBatchSampler(Shapes(SIZES), batch_size=batch_size, seed=0)
    assert len(list(sampler)) == len(sampler) == -(-len(SIZES) // batch_size)


class Listed:
    """An mmengine dataset of these image sizes, serialized as mmdet's datasets are."""

    def __new__(cls, sizes: list[tuple[int, int]]):
        from mmengine.dataset import BaseDataset

        class Sized(BaseDataset):
            def load_data_list(self) -> list[dict]:
                return [{"width": w, "height": h, "instances": [{"bbox": [0, 0, 1, 1]}] * 3}
                        for w, h in sizes]  # fmt: skip

        return Sized(ann_file="", serialize_data=True)


def test_orientations_are_kept_per_host_by_the_datasets_content(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from utils.data import sampling as data

    monkeypatch.setattr(data, "ORIENTATIONS_DIR", tmp_path)
    expected = np.array([h > w for w, h in SIZES])
    assert (data.orientations(Listed(SIZES)) == expected).all()
    (kept,) = tmp_path.glob("*.npy")
    assert (np.load(kept) == expected).all()
    assert (data.orientations(Listed(SIZES)) == expected).all()  # read back
    flipped = [(h, w) for w, h in SIZES]
    assert (data.orientations(Listed(flipped)) == ~expected).all()  # other content, other key
    assert len(list(tmp_path.glob("*.npy"))) == 2
    kept.write_bytes(b"damaged")
    assert (data.orientations(Listed(SIZES)) == expected).all()
    sampler = GroupedBatchSampler(Listed(SIZES), batch_size=4, seed=0)
    assert [b for b in sampler] == [b for b in GroupedBatchSampler(Shapes(SIZES), 4, seed=0)]
