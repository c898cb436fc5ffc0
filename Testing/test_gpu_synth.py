"""Training.synthesis.gpu_synth: the synthesis pack, label samples and domain-randomised images (on CPU)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from Training.synthesis.gpu_synth import GpuSynthesizer, LabelSampler, Pack, SynthConfig, build_pack, participant_split

SOOP_AFFINE = np.array([[-1.0, 0, 0, 78], [0, 1, 0, -112], [0, 0, 1, -50], [0, 0, 0, 1]])


def _fake_soop(root: Path) -> Path:
    """Four spherical 'lesions' on the real SOOP grid (MNI, 1 mm) and a participants table."""
    (root / "lesions").mkdir(parents=True)
    rows = ["participant_id\tsex\tage\tnihss\tpriorstroke"]
    centres_ras = [(-35, -10, 15), (30, 5, 20), (-20, -60, 10), (10, 30, 30)]
    radii = [12, 8, 4, 10]
    i, j, k = np.meshgrid(np.arange(157), np.arange(189), np.arange(136), indexing="ij")
    ras = np.stack([78 - i, j - 112, k - 50], -1)
    for number, (centre, radius) in enumerate(zip(centres_ras, radii, strict=True)):
        mask = (np.linalg.norm(ras - np.array(centre), axis=-1) <= radius).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, SOOP_AFFINE), str(root / "lesions" / f"bwsrsub-{number + 1}_lesion.nii.gz"))
        rows.append(f"sub-{number + 1}\t{'F' if number % 2 else 'M'}\t{60 + number}\t{4 * number + 2}\t0")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Pack:
    root = tmp_path_factory.mktemp("soop")
    path = build_pack(_fake_soop(root / "soop"), root / "pack.npz", workers=1)
    return Pack.load(path)


@pytest.mark.slow
def test_pack_keeps_lesion_volumes_and_clinical_values(pack: Pack) -> None:
    assert len(pack.lesion_boxes) == 4
    splits = [participant_split(p) for p in pack.participants]
    assert sorted(np.concatenate([pack.indices(s) for s in ("train", "val", "test")]).tolist()) == [0, 1, 2, 3]
    assert [splits[i] for i in pack.indices("train")] == ["train"] * len(pack.indices("train"))
    for index, radius in enumerate([12, 8, 4, 10]):
        volume_ml = float((pack.lesion(index) >= 0.5).sum()) * 0.008
        assert volume_ml == pytest.approx(4 / 3 * np.pi * radius**3 / 1000, rel=0.25)
    assert pack.lesion_meta[1].tolist()[:4] == [61.0, 0.0, 6.0, 0.0]  # age, sex F=0, NIHSS, prior stroke


@pytest.mark.slow
def test_label_samples_are_reproducible_and_outcome_contains_core(pack: Pack) -> None:
    sampler = LabelSampler(pack, subset="all", seed=3, empty_probability=0.0)
    first, again, other = sampler[5], sampler[5], sampler[6]
    np.testing.assert_array_equal(first["lesion"], again["lesion"])
    np.testing.assert_array_equal(first["clinical_values"], again["clinical_values"])
    assert not np.array_equal(first["clinical_values"], other["clinical_values"]) or not np.array_equal(
        first["lesion"], other["lesion"])
    core = first["lesion"] >= 0.5
    assert core.any() and np.all(first["outcome"][core] >= 0.5)


@pytest.mark.slow
def test_synthesised_batches_are_normalised_and_physical(pack: Pack) -> None:
    sampler = LabelSampler(pack, subset="all", seed=0, empty_probability=0.0)
    labels = torch.utils.data.default_collate([sampler[i] for i in range(3)])
    synth = GpuSynthesizer(pack, (64, 80, 64), "cpu")
    batch = synth(labels, torch.Generator().manual_seed(1))
    image, target, brain = batch["image"], batch["target"], batch["brain"]
    assert image.shape == (3, 3, 64, 80, 64) and target.shape == (3, 1, 64, 80, 64)
    assert torch.all(image * ~brain == 0)
    for case in range(3):
        inside = brain[case, 0]
        dwi, adc = image[case, 0], image[case, 1]
        assert float(dwi[inside].median()) == pytest.approx(1.0, abs=0.05)  # DWI / brain median
        assert 0.0 <= float(adc.min()) and float(adc.max()) <= 4.0  # 10^-3 mm^2/s, clipped
        assert 0.55 < float(adc[inside].median()) < 1.3
        lesion = target[case, 0] > 0.5
        if lesion.sum() > 20:
            assert float(adc[lesion].mean()) < float(adc[inside & ~lesion].median())  # restricted diffusion
    again = synth(labels, torch.Generator().manual_seed(1))
    assert torch.equal(again["image"], image)
    different = synth(labels, torch.Generator().manual_seed(2))
    assert not torch.allclose(different["image"], image)


@pytest.mark.slow
def test_grid_noise_adds_the_generators_noise_after_the_blur(pack: Pack) -> None:
    """``grid_noise`` adds Rician noise at the reconstructed resolution, as the test-set generator does: off, the
    images render exactly as before (no extra draws); on, the parenchyma's high-pass DWI fluctuation grows to the
    generator's level (sigma 0.05-0.11 of the white-matter signal, unit variance after the correlation), and the
    ADC's with it (computed from the same noisy pair), while the DWI stays normalised."""
    from scipy import ndimage

    sampler = LabelSampler(pack, subset="all", seed=0, empty_probability=1.0)
    labels = torch.utils.data.default_collate([sampler[i] for i in range(2)])
    plain = GpuSynthesizer(pack, (64, 80, 64), "cpu")(labels, torch.Generator().manual_seed(4))
    off = GpuSynthesizer(pack, (64, 80, 64), "cpu", SynthConfig(grid_noise=(0.0, 0.0)))(
        labels, torch.Generator().manual_seed(4))
    assert torch.equal(off["image"], plain["image"])
    fixed = SynthConfig(grid_noise=(0.11, 0.11), grid_noise_corr_vox=(0.6, 0.6))
    noisy = GpuSynthesizer(pack, (64, 80, 64), "cpu", fixed)(labels, torch.Generator().manual_seed(4))

    def high_pass(image: torch.Tensor, brain: torch.Tensor, channel: int) -> float:
        values = image[channel].numpy().astype(np.float64)
        inside = ndimage.binary_erosion(brain.numpy() & (image[1].numpy() > 0.55) & (image[1].numpy() < 0.85))
        smooth = ndimage.gaussian_filter(values, 1.0)
        residual = (values - smooth)[inside]
        return float(np.std(residual / (smooth[inside] if channel == 0 else 1.0)))

    for case in range(2):
        brain = plain["brain"][case, 0]
        assert float(noisy["image"][case, 0][noisy["brain"][case, 0]].median()) == pytest.approx(1.0, abs=0.05)
        for channel in (0, 1):
            before = high_pass(plain["image"][case], brain, channel)
            after = high_pass(noisy["image"][case], noisy["brain"][case, 0], channel)
            assert after > max(0.05, 1.4 * before), (case, channel, before, after)


@pytest.mark.slow
def test_cerebellar_cortex_has_its_own_lower_adc(pack: Pack) -> None:
    """Real cerebellar cortex has an ADC near white matter's (0.6-0.8 x10^-3 mm^2/s), far below the
    cerebral cortex's 0.9, and so is bright on DWI: the synthesis must show it, or the network learns
    that bright DWI with a low-normal ADC in the posterior fossa is a lesion."""
    from Training.synthesis.anatomy import POSTERIOR_FOSSA, TERRITORIES

    assert all("posterior fossa" in TERRITORIES[label] for label in POSTERIOR_FOSSA)
    sampler = LabelSampler(pack, subset="all", seed=0, empty_probability=1.0)  # no lesion: tissue only
    labels = torch.utils.data.default_collate([sampler[i] for i in range(2)])
    synth = GpuSynthesizer(pack, (64, 80, 64), "cpu")
    generator = torch.Generator().manual_seed(3)
    # where each model voxel lies in the template: the same seed redraws the grid, the first draw of synth()
    grid = synth._sampling_grid(2, generator)
    anatomy = torch.nn.functional.grid_sample(synth.anatomy.expand(2, -1, -1, -1, -1), grid, align_corners=True)
    batch = synth(labels, torch.Generator().manual_seed(3))
    adc, dwi, brain = batch["image"][:, 1], batch["image"][:, 0], batch["brain"][:, 0]
    gm, fossa = anatomy[:, 0], anatomy[:, 4]
    for case in range(2):
        cerebellar = brain[case] & (gm[case] > 0.7) & (fossa[case] > 0.9)
        cerebral = brain[case] & (gm[case] > 0.7) & (fossa[case] < 0.1)
        assert cerebellar.sum() > 50 and cerebral.sum() > 50
        assert float(adc[case][cerebellar].median()) < 0.9 * float(adc[case][cerebral].median())
        assert float(dwi[case][cerebellar].median()) > float(dwi[case][cerebral].median())


@pytest.mark.slow
def test_counterfactual_scenarios_keep_the_case_and_ride_along_the_same_warp(pack: Pack) -> None:
    """scenarios=2: the same item (same image labels, observed record, outcome) plus two counterfactual
    outcomes with their onset time and treatment; rendered with the same draws as without them."""
    from StrokePredictorLib.clinical import FEATURE_NAMES, FEATURES

    plain = LabelSampler(pack, subset="all", seed=3, empty_probability=0.0)
    counter = LabelSampler(pack, subset="all", seed=3, empty_probability=0.0, scenarios=2)
    first, second = plain[5], counter[5]
    for key, value in first.items():
        np.testing.assert_array_equal(value, second[key], err_msg=key)
    assert second["outcome_alt"].shape == (2, *first["lesion"].shape)
    core = first["lesion"] >= 0.5
    onset, treatment = FEATURE_NAMES.index("onset_to_imaging_h"), FEATURE_NAMES.index("treatment")
    for s in range(2):
        assert np.all(second["outcome_alt"][s][core] >= 0.5)  # every scenario keeps the core
        values, missing = second["clinical_values_alt"][s], second["clinical_missing_alt"][s]
        assert not missing[onset] and not missing[treatment]
        hours = values[onset] * FEATURES[onset].scale + FEATURES[onset].center
        assert 0.5 - 1e-3 <= hours <= 24.0 + 1e-3
        others = [i for i in range(10) if i not in (onset, treatment) and not first["clinical_missing"][i]]
        np.testing.assert_array_equal(values[others], first["clinical_values"][others])
    synth = GpuSynthesizer(pack, (48, 64, 48), "cpu")
    rendered = {name: synth(torch.utils.data.default_collate([sampler[5], sampler[6]]),
                            torch.Generator().manual_seed(1))
                for name, sampler in (("plain", plain), ("counter", counter))}
    assert torch.equal(rendered["plain"]["image"], rendered["counter"]["image"])
    assert torch.equal(rendered["plain"]["outcome"], rendered["counter"]["outcome"])
    alternatives = rendered["counter"]["outcome_alt"]
    assert alternatives.shape == (2, 2, 48, 64, 48)
    assert torch.all(alternatives >= rendered["counter"]["acute"])  # the core in every scenario


def test_pool_patches_take_one_scenario_whole() -> None:
    """A patch's clinical values and outcome target come from the same scenario."""
    from Training.synthesis.pool import PoolVolume, SynthPool

    pool = SynthPool.__new__(SynthPool)
    pool.grid_kji, pool.divisor, pool.rng = (32, 32, 32), 16, np.random.default_rng(0)
    empty = np.zeros((32, 32, 32), bool)
    full = ~empty
    scenario = (np.full(10, 7.0, np.float32), np.zeros(10, bool), full)
    pool.volumes = [PoolVolume(np.zeros((3, 32, 32, 32), np.float16), empty, empty, full, np.zeros(10, np.float32),
                               np.ones(10, bool), True, {"acute": [], "outcome": []}, scenarios=[scenario])]
    batch = pool.batch(40, (32, 32, 32), task="outcome", augment=False)
    chose = batch["clinical_values"][:, 0] == 7.0
    assert 0 < int(chose.sum()) < 40
    assert torch.all(batch["outcome"][chose] == 1.0) and torch.all(batch["outcome"][~chose] == 0.0)
    assert torch.all(batch["clinical_missing"][~chose]) and not torch.any(batch["clinical_missing"][chose])
    assert torch.equal(batch["target"], batch["outcome"]) and torch.all(batch["acute"] == 0.0)
