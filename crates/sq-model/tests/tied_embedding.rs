//! A tied model holds its embedding table once, in the LM head; lookups read the head's rows.

use sq_model::load_hf_dir;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf"
    ))
    .join(name)
}

#[test]
fn tied_embedding_lives_in_the_head() {
    let tied = load_hf_dir(&fixture("llama-tied-bf16")).unwrap().model;
    assert!(tied.config.tie_word_embeddings);
    assert!(tied.embed.in_lm_head);
    assert!(tied.embed.weight.is_empty());
    let (vocab, dim) = (tied.config.vocab_size, tied.embed.dim);
    assert_eq!(tied.embedding_rows(), vocab);
    let head = tied.lm_head.as_fp().unwrap().weight();
    let table = tied.embedding_table().unwrap();
    assert_eq!(&table[..], &head[..]);
    let mut row = vec![0.0f32; dim];
    for id in [0, 1, vocab / 2, vocab - 1] {
        tied.embedding_row(id, &mut row).unwrap();
        assert_eq!(&row[..], &head[id * dim..(id + 1) * dim], "row {id}");
    }
    assert!(tied.embedding_row(vocab, &mut row).is_err());
    assert!(tied.lm_head.linear.weight_row(0, &mut row[1..]).is_err());
    // One copy: the weights held are the head's, not the head's plus a table.
    let held = tied.weight_bytes();
    let untied_equivalent = held + 4 * vocab * dim;
    assert!(held < untied_equivalent);
    assert_eq!(
        tied.num_params(),
        tied.linears()
            .iter()
            .filter(|l| l.name != "lm_head")
            .map(|l| l.linear.in_features() * l.linear.out_features())
            .sum::<usize>()
            + vocab * dim
            + tied
                .norms()
                .iter()
                .map(|n| n.weight.len() + n.bias.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    );

    let untied = load_hf_dir(&fixture("llama-gqa")).unwrap().model;
    assert!(!untied.config.tie_word_embeddings);
    assert!(!untied.embed.in_lm_head);
    assert_eq!(
        untied.embed.weight.len(),
        untied.config.vocab_size * untied.embed.dim
    );
}
