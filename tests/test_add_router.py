"""The README's worked example: a router added as one class + one registry line, overriding no hook, trains
end to end through the shared layer (dispatch, losses, statistics, end_step) and the config keys it declares. Every
router of moe.ROUTERS is listed with the hooks it overrides (HOOKS); those that learn after each step learn once per
optimizer step through end_step, and a new one is handed its Step without edits elsewhere.
python -m pytest tests/test_add_router.py -q"""
import re
from pathlib import Path

import torch

import moe
from model import GPT, GPTConfig

README = Path(__file__).resolve().parents[1] / 'README.md'


def readme_router_code():
    section = README.read_text().split('## Add a router')[1]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_readme_router_trains_and_is_registered(monkeypatch):
    monkeypatch.setitem(moe.ROUTERS, 'noisy_topk', None)  # removed from the registry after the test
    exec(readme_router_code(), vars(moe))
    cls = moe.ROUTERS['noisy_topk']
    assert cls.options == dict(noise_scale=1.0)
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, router='noisy_topk',
                       n_experts=4, top_k=2, router_options=dict(noise_scale=0.5))
    model = GPT(config)
    assert model.moe_layers()[0].router.scale == 0.5
    x = torch.randint(0, 32, (4, 17))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    losses = []
    for _ in range(40):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe.end_step(model)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.moe_layers()[0].router.noise.weight.grad.abs().sum() > 0  # the noise net is trained
    stats = model.moe_layers()[0].stats()
    assert sum(stats['load']) == 40 * 4 * 16 * 2  # every assignment counted by the shared statistics


# every router of moe.ROUTERS and the Router hooks it overrides; a router added to moe.py is added here
HOOKS = {'softmax': set(), 'switch': set(), 'sigmoid': set(), 'cosine': {'after_step'},
         'perturbed_cosine': {'after_step'},
         'hyper': set(), 'deepseek': {'after_step'}, 'quantile': {'after_step'}, 'tcmoe': set(),
         'moepp': {'cheap_output'}, 'remoe': {'after_step'}, 'topp': {'select'}, 'expert_choice': set()}
# what each router that learns after a step keeps in a buffer (in checkpoints)
LEARNED = {'deepseek': 'expert_bias', 'quantile': 'qb_beta', 'remoe': 'l1_coef'}
# the routers whose after_step sets a parameter (the cosine routers' M back to norm 1.5), not a buffer
RENORMED = {'cosine', 'perturbed_cosine'}


def test_every_router_is_listed_with_its_hooks():
    assert set(HOOKS) == set(moe.ROUTERS), "list a new router in HOOKS with the hooks it overrides"
    for name, cls in moe.ROUTERS.items():
        overridden = {h for h in ('select', 'cheap_output', 'replay_weights')
                      if getattr(cls, h) is not getattr(moe.Router, h)}
        overridden |= {'after_step'} if cls.learns_after_step() else set()
        assert overridden == HOOKS[name], name
    assert {n for n, h in HOOKS.items() if 'after_step' in h} == set(LEARNED) | RENORMED


def small_model(router, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, router=router, n_experts=4,
                          top_k=2, **kw))
    with torch.no_grad():
        for m in model.moe_layers():
            m.router.gate.weight.normal_(0, 1.0)
    return model


def test_routers_learn_once_per_step_through_end_step():
    """each router of LEARNED: two micro-batches and an eval forward leave its buffer alone, a skipped step
    (end_step(update=False)) too; end_step after the next step moves it"""
    for router, buffer in LEARNED.items():
        model = small_model(router)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        learned = [getattr(m.router, buffer) for m in model.moe_layers()]
        for update in (False, True):
            before = [b.clone() for b in learned]
            for _ in range(2):
                x = torch.randint(0, 32, (4, 17))
                model(x[:, :-1], x[:, 1:])[1].backward()
            model.eval()
            model(torch.randint(0, 32, (2, 16)))
            model.train()
            assert all(torch.equal(b, a) for b, a in zip(learned, before)), router
            opt.step()
            opt.zero_grad()
            moe.end_step(model, update=update)
            moved = [not torch.equal(b, a) for b, a in zip(learned, before)]
            assert moved == [update, update], (router, update)


def test_a_new_router_learns_after_step_without_edits_elsewhere(monkeypatch):
    """a router class overriding after_step, registered with one line: end_step hands it each layer's Step, the
    assignments per expert, tokens, forwards and the sums of its Routing.step over the step's training forwards
    (kept by hand here); no other file names it"""
    got, seen = [], []

    class Counting(moe.Router):
        def __init__(self, config):
            super().__init__(config)
            self.gate = torch.nn.Linear(config.n_embd, config.n_experts, bias=False)
            self.step_width = config.n_experts

        def forward(self, x, prev=None):
            p = self.gate(x).softmax(-1)
            w, ids = self.select(p)
            if self.training and torch.is_grad_enabled():
                seen.append((self, ids.detach(), p.detach().sum(0)))
            return moe.Routing(ids=ids, weights=w, probs=p, logits=None, step=p.detach().sum(0))

        @classmethod
        def after_step(cls, routers, step):
            got.append((list(routers), step))

    monkeypatch.setitem(moe.ROUTERS, 'counting', Counting)
    model = small_model('counting')
    for _ in range(2):
        x = torch.randint(0, 32, (4, 17))
        model(x[:, :-1], x[:, 1:])[1].backward()
    moe.end_step(model)
    (routers, step), = got
    assert routers == [m.router for m in model.moe_layers()]
    for j, router in enumerate(routers):
        mine = [(ids, s) for r, ids, s in seen if r is router]
        counts = torch.zeros(4)
        for ids, _ in mine:
            counts += torch.bincount(ids.flatten(), minlength=4)
        assert torch.equal(step.counts[j], counts) and step.tokens[j] == 2 * 64 and step.forwards[j] == 2
        torch.testing.assert_close(step.sums[j], mine[0][1] + mine[1][1])
