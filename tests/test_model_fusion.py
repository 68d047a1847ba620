"""The generative + prototype fusion (beyond the paper) and the first-token prior, on hand-made scores."""
import torch

from gmm_model.classify import first_token_prior, fused_scores, zscore


def fuse_with_prototypes(first_token_log_prob, visual, prototypes):
    return fused_scores(first_token_log_prob, visual, prototypes).argmax(1)


def test_zscore_standardises_rows():
    z = zscore(torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]]))
    assert torch.allclose(z.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(z.std(1), torch.ones(2), atol=1e-6)


def test_fusion_lets_a_clear_prototype_match_overrule_a_slight_generative_preference():
    prototypes = torch.eye(3)  # class c's prototype points along axis c
    visual = torch.tensor([[[0.6, 0.8, 0.0]] * 2])  # (1, 2 tokens, 3): closer to class 1 than to class 0
    slight = torch.tensor([[-1.0, -1.1, -3.0]])  # the LLM slightly prefers class 0
    strong = torch.tensor([[-0.1, -6.0, -6.5]])  # the LLM is sure of class 0
    assert fuse_with_prototypes(slight, visual, prototypes).tolist() == [1]
    assert fuse_with_prototypes(strong, visual, prototypes).tolist() == [0]


def test_fusion_breaks_ties_between_classes_sharing_a_first_token():
    prototypes = torch.eye(2)
    visual = torch.tensor([[[0.2, 0.9]]])
    tied = torch.tensor([[-0.5, -0.5]])
    assert fuse_with_prototypes(tied, visual, prototypes).tolist() == [1]


def test_first_token_prior_is_the_log_mean_probability_over_class_means():
    # rows: the model's log p(first token of class c) on the mean features of class m
    p = torch.tensor([[0.7, 0.2, 0.1],
                      [0.6, 0.3, 0.1],
                      [0.5, 0.1, 0.4]])
    prior = first_token_prior(p.log())
    assert torch.allclose(prior.exp(), p.mean(0))
    # class 0 is favoured on every class's mean: its prior is the largest, so correcting by it
    # turns a sample that prefers class 0 only slightly into class 1
    sample = torch.tensor([[0.45, 0.40, 0.15]]).log()
    assert sample.argmax(1).tolist() == [0]
    assert (sample - prior).argmax(1).tolist() == [1]
