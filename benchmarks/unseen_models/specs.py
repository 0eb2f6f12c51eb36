"""Model specs for run_all.py. ORDER (name, budget seconds) is importable
without torch; get(name, big) imports what the spec needs.

A spec: build() -> nn.Module on the CPU (deterministic under manual_seed),
inputs(gen) -> tuple of CPU tensors (dicts allowed), forward(model, *args),
loss(out, *args), opt(params), optional clip, autocast (bf16),
all_params (give the optimizer frozen parameters too)."""

# Most informative first: GPU-specific behaviour (optimizer variants, cuDNN
# convs/RNNs, SDPA attention, CUDA autocast/dropout), then the rest.
ORDER = [
    ("wide-mlp-foreach-adam", 30),
    ("resnet50", 60),
    ("gpt2", 50),
    ("wide-mlp-fused-adam", 25),
    ("wide-mlp-single-adam", 25),
    ("vit_s", 50),
    ("lstm_lm", 30),
    ("bf16_autocast", 25),
    ("mlp_dropout", 25),
    ("t5_encdec", 60),
    ("mha_dropout", 30),
    ("transformer_encoder", 30),
    ("graph_break_tail_noparams", 25),
    ("gpt2_labels_inside", 45),
    ("efficientnet_b0", 60),
    ("distilbert_dictin", 45),
    ("gru_lm_tied", 30),
    ("lstm_bf16_clip_sgd", 30),
    ("convnext_tiny", 60),
    ("mobilenet_v3_small", 50),
    ("graph_break_item", 25),
    ("adam_single_tensor", 25),
    ("sgd_momentum_nesterov", 25),
    ("clip_grad_norm", 25),
    ("frozen_all_params_in_opt", 25),
    ("frozen_trainable_only", 25),
    ("dict_output", 25),
    ("adam_amsgrad_wd", 25),
    ("swin_t", 75),
    ("t5_loss_inside", 50),
    ("densenet121", 90),
    ("unet_groupnorm", 40),
    ("custom_autograd_fn", 25),
    ("weight_norm_sdpa_causal", 30),
    ("ema_buffer_param_groups", 25),
]
NAMES = [n for n, _ in ORDER]
BUDGET = dict(ORDER)


def get(name, big):
    """The spec dict for ``name``; big=True: GPU sizes, False: tiny CPU sizes."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def ce(o, x, y):
        return F.cross_entropy(o, y)

    def fwd(m, x, y):
        return m(x)

    adam_fused = lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)

    # ---- wide MLP, optimizer variants
    if name.startswith("wide-mlp-"):
        W, B = (4096, 8) if big else (256, 4)
        kind = name.split("-")[2]
        opt = {"foreach": lambda p: torch.optim.Adam(p),  # default: foreach on CUDA
               "fused": lambda p: torch.optim.Adam(p, fused=True),
               "single": lambda p: torch.optim.Adam(p, foreach=False)}[kind]
        return dict(build=lambda: nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(W, W), nn.ReLU())]),
                    inputs=lambda g: (torch.randn(B, W, generator=g), torch.randint(0, W, (B,), generator=g)),
                    forward=fwd, loss=ce, opt=opt, opt_focus=True)

    # ---- torchvision
    tv = {"resnet50", "vit_s", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_small", "swin_t", "densenet121"}
    if name in tv:
        import torchvision
        B, S = (16, 224) if big else (2, 64)
        builders = {
            "resnet50": lambda: torchvision.models.resnet50(),
            "vit_s": (lambda: torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=6, num_heads=6,
                                                                   hidden_dim=384, mlp_dim=1536)) if big else
                     (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                                   hidden_dim=64, mlp_dim=128, num_classes=10)),
            "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
            "convnext_tiny": lambda: torchvision.models.convnext_tiny(),
            "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
            "swin_t": lambda: torchvision.models.swin_t(),
            "densenet121": lambda: torchvision.models.densenet121(),
        }
        if name == "vit_s" and not big:
            S = 32
        ncls = 10 if (name == "vit_s" and not big) else 1000
        return dict(build=builders[name],
                    inputs=lambda g: (torch.randn(B, 3, S, S, generator=g), torch.randint(0, ncls, (B,), generator=g)),
                    forward=fwd, loss=ce, opt=adam_fused)

    # ---- Hugging Face
    hf = {"gpt2", "gpt2_labels_inside", "t5_encdec", "t5_loss_inside", "distilbert_dictin"}
    if name in hf:
        V = 8192 if big else 100
        adamw = lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01)  # foreach on CUDA
        if name.startswith("gpt2"):
            from transformers import GPT2Config, GPT2LMHeadModel
            E, L, H, B, T = (256, 4, 4, 8, 256) if big else (32, 2, 2, 2, 16)
            build = lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=E, n_layer=L, n_head=H,
                                                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
            ids = lambda g: (torch.randint(0, V, (B, T), generator=g),)
            if name == "gpt2":
                return dict(build=build, inputs=ids, forward=lambda m, i: m(i).logits, opt=adamw,
                            loss=lambda lg, i: F.cross_entropy(lg[:, :-1].reshape(-1, V), i[:, 1:].reshape(-1)))
            return dict(build=build, inputs=ids, forward=lambda m, i: m(i, labels=i).loss, loss=lambda l, i: l, opt=adamw)
        if name.startswith("t5"):
            from transformers import T5Config, T5ForConditionalGeneration
            D, KV, FF, L, H, B, TS, TT = (256, 32, 1024, 4, 8, 8, 128, 64) if big else (32, 8, 64, 2, 2, 2, 12, 8)
            build = lambda: T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=D, d_kv=KV, d_ff=FF, num_layers=L,
                                                                num_decoder_layers=L, num_heads=H, dropout_rate=0.0,
                                                                decoder_start_token_id=0, pad_token_id=0))
            inp = lambda g: (torch.randint(1, V, (B, TS), generator=g), torch.randint(1, V, (B, TT), generator=g))
            if name == "t5_encdec":
                return dict(build=build, inputs=inp, forward=lambda m, s, t: m(input_ids=s, labels=t).logits, opt=adamw,
                            loss=lambda lg, s, t: F.cross_entropy(lg.reshape(-1, V), t.reshape(-1)))
            return dict(build=build, inputs=inp, forward=lambda m, s, t: m(input_ids=s, labels=t).loss,
                        loss=lambda l, s, t: l, opt=adamw)
        from transformers import DistilBertConfig, DistilBertForSequenceClassification
        D, L, H, FF, B, T = (256, 4, 4, 1024, 16, 128) if big else (32, 2, 2, 64, 2, 16)
        build = lambda: DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=V, dim=D, n_layers=L, n_heads=H, hidden_dim=FF, max_position_embeddings=max(T, 64), num_labels=3,
            dropout=0.1, attention_dropout=0.1, seq_classif_dropout=0.1))
        inp = lambda g: ({"input_ids": torch.randint(0, V, (B, T), generator=g),
                          "attention_mask": torch.ones(B, T, dtype=torch.long)}, torch.randint(0, 3, (B,), generator=g))
        return dict(build=build, inputs=inp, forward=lambda m, b, y: m(**b).logits,
                    loss=lambda lg, b, y: F.cross_entropy(lg, y), opt=adamw)

    # ---- custom modules
    V, D, B, T = (8192, 512, 16, 128) if big else (50, 32, 2, 12)
    I, Hd, Bm = (1024, 2048, 64) if big else (16, 32, 8)

    class RNNLM(nn.Module):
        def __init__(self, cell="lstm", tie=False):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(D, D, num_layers=2, batch_first=True)
            self.out = nn.Linear(D, V)
            if tie:
                self.out.weight = self.emb.weight

        def forward(self, ids):
            h, _ = self.rnn(self.emb(ids))
            return self.out(h)

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.attn = nn.MultiheadAttention(D, 8, batch_first=True, dropout=0.1)
            self.ln = nn.LayerNorm(D)
            self.head = nn.Linear(D, V)

        def forward(self, ids):
            x = self.emb(ids)
            a, _ = self.attn(x, x, x, need_weights=False)
            return self.head(self.ln(x + a))

    class TEnc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 8, 4 * D, dropout=0.1, batch_first=True), 2,
                                             enable_nested_tensor=False)
            self.head = nn.Linear(D, V)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)))

    class MLP(nn.Module):
        def __init__(self, out="tensor", drop=0.0, brk=None):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(I, Hd), nn.Linear(Hd, Hd), nn.Linear(Hd, 10)
            self.drop = nn.Dropout(drop)
            self.out, self.brk = out, brk

        def forward(self, x):
            h = self.drop(F.relu(self.l1(x)))
            if self.brk == "item":
                h = h * (1.0 + 0.0 * float(h.mean().item()))
            h = F.relu(self.l2(h))
            y = self.l3(h)
            if self.brk == "tail":
                torch._dynamo.graph_break()
                y = y * 2.0  # no parameters after the break
            if self.out == "dict":
                return {"logits": y, "hidden": h}
            return y

    class Swish(torch.autograd.Function):
        """A hand-written activation with its own backward."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * torch.sigmoid(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return g * s * (1 + x * (1 - s))

    class SwishMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(I, Hd), nn.Linear(Hd, Hd), nn.Linear(Hd, 10)

        def forward(self, x):
            return self.l3(Swish.apply(self.l2(Swish.apply(self.l1(x)))))

    C, Bu, Su = (32, 8, 128) if big else (8, 2, 16)

    class UNet(nn.Module):
        """GroupNorm, InstanceNorm, a transposed conv, bilinear upsampling and a skip connection."""

        def __init__(self):
            super().__init__()
            self.down1 = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.GroupNorm(4, C), nn.SiLU())
            self.down2 = nn.Sequential(nn.Conv2d(C, 2 * C, 3, stride=2, padding=1),
                                       nn.InstanceNorm2d(2 * C, affine=True), nn.GELU())
            self.up = nn.ConvTranspose2d(2 * C, C, 2, stride=2)
            self.head = nn.Conv2d(2 * C, 10, 1)

        def forward(self, x):
            a = self.down1(x)
            b = self.down2(a)
            up = self.up(b) + F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False)[:, :C]
            return self.head(torch.cat([a, up], 1)).mean((2, 3))

    class WeightNormAttention(nn.Module):
        """A weight-norm parametrized projection and causal scaled_dot_product_attention."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.qkv = nn.utils.parametrizations.weight_norm(nn.Linear(D, 3 * D))
            self.head = nn.Linear(D, V)

        def forward(self, ids):
            x = self.emb(ids)
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 8, D // 8).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.head(x + a.transpose(1, 2).reshape(x.shape))

    class EMAMLP(nn.Module):
        """A buffer updated in forward under no_grad (a running mean and a counter)."""

        def __init__(self):
            super().__init__()
            self.l1, self.ln, self.l2 = nn.Linear(I, Hd), nn.LayerNorm(Hd), nn.Linear(Hd, 10)
            self.register_buffer("ema", torch.zeros(Hd))
            self.register_buffer("count", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            h = F.relu(self.ln(self.l1(x)))
            with torch.no_grad():
                self.ema.mul_(0.9).add_(h.mean(0), alpha=0.1)
                self.count += 1
            return self.l2(h - self.ema)

    def adamw_decay_groups(params):
        """The usual transformer recipe: no weight decay for biases and norms."""
        return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": 3e-4}],
                                 lr=1e-3, fused=True)

    def frozen_mlp():
        m = MLP()
        m.l1.requires_grad_(False)
        return m

    lm_in = lambda g: (torch.randint(0, V, (B, T), generator=g),)
    lm_fwd = lambda m, ids: m(ids)
    lm_loss = lambda lg, ids: F.cross_entropy(lg[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    x_in = lambda g: (torch.randn(Bm, I, generator=g), torch.randint(0, 10, (Bm,), generator=g))
    S = {
        "lstm_lm": dict(build=lambda: RNNLM("lstm"), inputs=lm_in, forward=lm_fwd, loss=lm_loss, opt=adam_fused),
        "gru_lm_tied": dict(build=lambda: RNNLM("gru", tie=True), inputs=lm_in, forward=lm_fwd, loss=lm_loss, opt=adam_fused),
        "lstm_bf16_clip_sgd": dict(build=lambda: RNNLM("lstm"), inputs=lm_in, forward=lm_fwd, loss=lm_loss, autocast=True,
                                   clip=1.0, opt=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        "mha_dropout": dict(build=MHA, inputs=lm_in, forward=lm_fwd, loss=lm_loss, opt=adam_fused),
        "transformer_encoder": dict(build=TEnc, inputs=lm_in, forward=lm_fwd, loss=lm_loss, opt=adam_fused),
        "frozen_trainable_only": dict(build=frozen_mlp, inputs=x_in, forward=fwd, loss=ce, opt=adam_fused),
        "frozen_all_params_in_opt": dict(build=frozen_mlp, inputs=x_in, forward=fwd, loss=ce, opt=adam_fused, all_params=True),
        "dict_output": dict(build=lambda: MLP("dict"), inputs=x_in, forward=lambda m, x, y: m(x)["logits"], loss=ce,
                            opt=adam_fused),
        "clip_grad_norm": dict(build=MLP, inputs=x_in, forward=fwd, loss=ce, opt=adam_fused, clip=0.5),
        "adam_single_tensor": dict(build=MLP, inputs=x_in, forward=fwd, loss=ce,
                                   opt=lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False)),
        "adam_amsgrad_wd": dict(build=MLP, inputs=x_in, forward=fwd, loss=ce,
                                opt=lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, weight_decay=0.1)),
        "sgd_momentum_nesterov": dict(build=MLP, inputs=x_in, forward=fwd, loss=ce,
                                      opt=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)),
        "bf16_autocast": dict(build=MLP, inputs=x_in, forward=fwd, loss=ce, opt=adam_fused, autocast=True),
        "mlp_dropout": dict(build=lambda: MLP(drop=0.3), inputs=x_in, forward=fwd, loss=ce, opt=adam_fused),
        "graph_break_item": dict(build=lambda: MLP(brk="item"), inputs=x_in, forward=fwd, loss=ce, opt=adam_fused),
        "graph_break_tail_noparams": dict(build=lambda: MLP(brk="tail"), inputs=x_in, forward=fwd, loss=ce, opt=adam_fused),
        "unet_groupnorm": dict(build=UNet, inputs=lambda g: (torch.randn(Bu, 3, Su, Su, generator=g),
                                                             torch.randint(0, 10, (Bu,), generator=g)),
                               forward=fwd, loss=ce, opt=adam_fused),
        "custom_autograd_fn": dict(build=SwishMLP, inputs=x_in, forward=fwd, loss=ce, opt=adam_fused),
        "weight_norm_sdpa_causal": dict(build=WeightNormAttention, inputs=lm_in, forward=lm_fwd, loss=lm_loss,
                                        opt=adam_fused),
        "ema_buffer_param_groups": dict(build=EMAMLP, inputs=x_in, forward=fwd, loss=ce, opt=adamw_decay_groups),
    }
    return S[name]
