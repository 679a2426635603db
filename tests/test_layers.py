import torch
from torch import nn

from mpsearch.layers import discover, model_fingerprint


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, groups=6))
        self.attn = nn.Module()
        self.attn.q_proj, self.attn.k_proj, self.attn.v_proj = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)
        self.tied_head = nn.Linear(6, 4)
        self.tied_head.weight = self.head.weight

    def forward(self, x, tokens):
        e = self.conv1d(self.emb(tokens).transpose(1, 2)).mean()
        h = self.body(x).mean((2, 3))
        h = self.attn.q_proj(h) + self.attn.k_proj(h) + self.attn.v_proj(h)
        return self.head(h) + self.tied_head(h) + e


def test_discover_names_kinds_macs_and_ties():
    model = Mixed()
    example = (torch.randn(2, 3, 5, 5), torch.randint(0, 50, (2, 7)))
    layers, ties = discover(model, example=example)
    by_name = {info.name: info for info in layers}
    assert list(by_name) == [
        "conv1d",
        "body.0",
        "body.1",
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "head",
        "tied_head",
    ]
    assert by_name["body.1"].kind == "depthwise_conv"
    assert by_name["body.0"].kind == "conv2d"
    assert by_name["body.0"].macs == 6 * 5 * 5 * 3 * 9  # outputs per sample x (in/groups * kernel)
    assert by_name["body.1"].macs == 6 * 5 * 5 * 9
    assert by_name["conv1d"].macs == 8 * 7 * 8 * 3
    assert by_name["head"].macs == 4 * 6
    assert ties == [["head", "tied_head"]]
    _, fused = discover(model, tie_fused=True)
    assert ["attn.q_proj", "attn.k_proj", "attn.v_proj"] in fused
    with_emb, _ = discover(model, include_embeddings=True)
    assert "emb" in [i.name for i in with_emb]
    assert all(i.macs is None for i in discover(model)[0])


def test_discover_leaves_no_hooks_and_fingerprint_tracks_weights():
    model = Mixed()
    fp = model_fingerprint(model)
    discover(model, example=(torch.randn(1, 3, 4, 4), torch.randint(0, 50, (1, 3))))
    assert all(not m._forward_hooks for m in model.modules())
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        model.head.weight[0, 0] += 1e-6
    assert model_fingerprint(model) != fp
