"""The controls the evaluations compare against: a shuffled-latent control must never give a clip its own latent."""
import torch

from lawm.models import IDMConfig, LAMConfig, LatentActionWorldModel, RegConfig
from lawm.training.objectives import LAMObjective


def test_shuffled_latent_control_never_pairs_a_clip_with_its_own_latent():
    torch.manual_seed(0)
    lam = LatentActionWorldModel(LAMConfig(feat_dim=8, grid_h=2, grid_w=2, latent_dim=4, reg=RegConfig(kind="none"),
                                           idm=IDMConfig(width=24, heads=4)))
    objective = LAMObjective(lam).eval()
    given: list[torch.Tensor] = []
    predict = lam.predict
    lam.predict = lambda s, z: given.append(z) or predict(s, z)  # a spy: records the latents each call is driven by
    for batch_size in (2, 3, 4, 5, 8) * 4:  # a random permutation leaves some clip in place in most of these
        given.clear()
        out = objective.evaluate({"feats": torch.randn(batch_size, 3, 4, 8)})
        own, shuffled = given  # one_step_error, then error_shuffled_z
        assert torch.isfinite(torch.tensor(list(out.values()))).all()
        for i in range(batch_size):  # every clip gets another clip's latent, and every latent is used once
            assert not torch.equal(shuffled[i], own[i]), f"clip {i} of {batch_size} got its own latent"
        assert sorted(map(tuple, shuffled.flatten(1).tolist())) == sorted(map(tuple, own.flatten(1).tolist()))
