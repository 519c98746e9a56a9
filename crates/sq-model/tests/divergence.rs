//! `ReferenceDistributions`: the KL divergence of a model from a reference model on text
//! windows, checked against a direct f64 computation over the whole vocabulary.

use sq_model::runner::Forward;
use sq_model::{load, perplexity, Logits, Model, ReferenceDistributions};

const SEQ: usize = 48;

fn tokens(vocab: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + i * i * 13) % vocab) as u32)
        .collect()
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&l| l as f64 - lse).collect()
}

fn all_logits(m: &Model, window: &[u32]) -> Vec<f32> {
    let mut s = m.new_session(window.len()).unwrap();
    let mut out = Vec::new();
    m.forward(window, &mut s, Logits::All, &mut out).unwrap();
    out
}

/// Per window, the mean over predicted positions of the full KL(P || Q) and of the coarsened KL
/// (P's top `k` tokens and one bucket for the rest).
fn direct_kl(p: &Model, q: &Model, toks: &[u32], windows: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let vocab = p.config.vocab_size;
    let (mut full, mut coarse) = (Vec::new(), Vec::new());
    for w in 0..windows {
        let window = &toks[w * SEQ..(w + 1) * SEQ];
        let (lp, lq) = (all_logits(p, window), all_logits(q, window));
        let (mut f, mut c) = (0.0, 0.0);
        for pos in 0..SEQ - 1 {
            let a = log_softmax(&lp[pos * vocab..(pos + 1) * vocab]);
            let b = log_softmax(&lq[pos * vocab..(pos + 1) * vocab]);
            f += a
                .iter()
                .zip(&b)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>();
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&i, &j| a[j].total_cmp(&a[i]).then(i.cmp(&j)));
            let (top, rest) = order.split_at(k);
            c += top.iter().map(|&i| a[i].exp() * (a[i] - b[i])).sum::<f64>();
            let pt: f64 = rest.iter().map(|&i| a[i].exp()).sum();
            let qt: f64 = rest.iter().map(|&i| b[i].exp()).sum();
            c += pt * (pt.ln() - qt.ln());
        }
        full.push(f / (SEQ - 1) as f64);
        coarse.push(c / (SEQ - 1) as f64);
    }
    (full, coarse)
}

#[test]
fn divergence_matches_a_direct_computation() {
    let reference = load(None, None).unwrap().model;
    let vocab = reference.config.vocab_size;
    let toks = tokens(vocab, 3 * SEQ + 5);
    // Another model: the reference with its last norm and one attention norm perturbed.
    let mut other = reference.try_clone().unwrap();
    for (i, g) in other
        .final_norm
        .as_mut()
        .unwrap()
        .weight
        .iter_mut()
        .enumerate()
    {
        *g *= 1.0 + 0.3 * ((i as f32) * 0.7).sin();
    }
    for (i, g) in other.layers[0].attn_norm.weight.iter_mut().enumerate() {
        *g *= 1.0 + 0.2 * ((i as f32) * 1.3).cos();
    }

    // Itself: zero divergence, and the NLL of `perplexity`.
    let refd = ReferenceDistributions::new(&reference, &toks, SEQ, None, 16).unwrap();
    assert_eq!(refd.windows(), 3);
    let same = refd.divergence(&reference).unwrap();
    assert!(same.mean_kl.abs() < 1e-6, "{}", same.mean_kl);
    let ppl = perplexity(&reference, &toks, SEQ, None, |_, _| {}).unwrap();
    assert!((same.mean_nll - ppl.mean_nll).abs() < 1e-5 * ppl.mean_nll);

    // The other model, coarsened to 16 tokens + tail and uncoarsened (all but one token kept).
    let d16 = refd.divergence(&other).unwrap();
    let full_ref = ReferenceDistributions::new(&reference, &toks, SEQ, Some(2), vocab - 1).unwrap();
    let dfull = full_ref.divergence(&other).unwrap();
    let (want_full, _) = direct_kl(&reference, &other, &toks, 2, vocab - 1);
    let (_, want16) = direct_kl(&reference, &other, &toks, 3, 16);
    for (got, want) in dfull.window_kl.iter().zip(&want_full) {
        assert!(
            (got - want).abs() < 1e-4 * want + 1e-7,
            "full: {got} vs {want}"
        );
    }
    for (got, want) in d16.window_kl.iter().zip(&want16) {
        assert!(
            (got - want).abs() < 1e-4 * want + 1e-7,
            "top 16: {got} vs {want}"
        );
    }
    assert!(
        d16.mean_kl > 1e-4,
        "the perturbation moves the distributions"
    );
    // Coarsening can only lose divergence.
    for (c, f) in d16.window_kl.iter().zip(&dfull.window_kl) {
        assert!(c <= &(f + 1e-7), "{c} > {f}");
    }

    // Paired difference: zero against itself, and the per-window mean of differences.
    let (d, se) = d16.paired_difference(&d16).unwrap();
    assert_eq!((d, se), (0.0, 0.0));
    let (d, se) = d16.paired_difference(&same).unwrap();
    assert!((d - d16.mean_kl).abs() < 1e-6 && se > 0.0);
}

#[test]
fn reference_distributions_refuse_bad_arguments() {
    let reference = load(None, None).unwrap().model;
    let vocab = reference.config.vocab_size;
    let toks = tokens(vocab, 2 * SEQ);
    for k in [0, vocab] {
        let e = ReferenceDistributions::new(&reference, &toks, SEQ, None, k).unwrap_err();
        assert!(e.to_string().contains("top_k"), "{e}");
    }
    assert!(ReferenceDistributions::new(&reference, &toks[..SEQ - 1], SEQ, None, 8).is_err());
    assert!(ReferenceDistributions::new(&reference, &toks, 1, None, 8).is_err());
}
