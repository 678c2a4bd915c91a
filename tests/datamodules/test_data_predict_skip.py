"""A resumed tokenize run: the sentence DataModule leaves out the sentences the TokenWriter says are written."""

from types import SimpleNamespace

from datamodules import BuiltinSource, VisualSentenceDataModule


def make_dm(skip: set[int], world_size: int = 1, rank: int = 0) -> VisualSentenceDataModule:
    dm = VisualSentenceDataModule(
        BuiltinSource(splits={"train": 9, "val": 2, "test": 2}), image_size=16, unit="sentence", batch_size=2
    )
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    dm.skip_predict(skip)  # what the TokenWriter does at setup of a resumed run
    return dm


def indices(dm: VisualSentenceDataModule) -> list[int]:
    return [i for batch in dm.predict_dataloader() for i in batch.index.tolist()]


def test_no_skip_keeps_every_sentence_in_order():
    assert indices(make_dm(set())) == list(range(9))


def test_skipped_sentences_are_not_loaded_and_rank_shares_stay_in_order():
    assert indices(make_dm({0, 2, 3})) == [1, 4, 5, 6, 7, 8]
    assert indices(make_dm({2}, world_size=2, rank=0)) == [0, 4, 6, 8]
    assert indices(make_dm({2}, world_size=2, rank=1)) == [1, 3, 5, 7]
