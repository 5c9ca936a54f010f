//! Classification metrics: the area under the ROC curve of one class against the rest, and a
//! confusion matrix with per-class precision, recall and F1 (scikit-learn's definitions, a
//! quotient with nothing to divide counted as 0, as its `zero_division=0`).

use serde::Serialize;

/// The area under the ROC curve of `scores` for telling `positive` items from the others: the
/// probability that a random positive scores above a random negative, ties counting one half
/// (the Mann–Whitney U statistic over the product of the two counts, from average ranks).
/// None when either side is empty.
pub fn auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Ranks from 1; a run of equal scores shares its average rank.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += rank * order[i..=j].iter().filter(|&&k| positive[k]).count() as f64;
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos * n_neg) as f64)
}

/// Counts of (true class, predicted class) pairs: `counts[truth][predicted]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Confusion {
    pub counts: Vec<Vec<usize>>,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self {
            counts: vec![vec![0; classes]; classes],
        }
    }

    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.counts[truth][predicted] += 1;
    }

    pub fn classes(&self) -> usize {
        self.counts.len()
    }

    pub fn total(&self) -> usize {
        self.counts.iter().flatten().sum()
    }

    /// Items of class `c`.
    pub fn support(&self, c: usize) -> usize {
        self.counts[c].iter().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let right: usize = (0..self.classes()).map(|c| self.counts[c][c]).sum();
        ratio(right, self.total())
    }

    /// Of the items predicted `c`, the share that are `c`.
    pub fn precision(&self, c: usize) -> f64 {
        let predicted: usize = self.counts.iter().map(|row| row[c]).sum();
        ratio(self.counts[c][c], predicted)
    }

    /// Of the items of class `c`, the share predicted `c`.
    pub fn recall(&self, c: usize) -> f64 {
        ratio(self.counts[c][c], self.support(c))
    }

    pub fn f1(&self, c: usize) -> f64 {
        let (p, r) = (self.precision(c), self.recall(c));
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    /// The unweighted mean of the per-class F1.
    pub fn macro_f1(&self) -> f64 {
        (0..self.classes()).map(|c| self.f1(c)).sum::<f64>() / self.classes() as f64
    }
}

/// The Inception Score's formula (Salimans et al. 2016) on a classifier's softmax
/// probabilities, one row per image: exp(E_x KL(p(y|x) ‖ p(y))), with p(y) the mean of the rows,
/// over all images at once (no splits). 1 when every image gets the same distribution; at most
/// the number of classes, reached when each image is certain and the classes are used equally.
/// None for no images.
pub fn inception_score_like(probs: &[Vec<f64>]) -> Option<f64> {
    let first = probs.first()?;
    let n = probs.len() as f64;
    let marginal: Vec<f64> = (0..first.len())
        .map(|c| probs.iter().map(|p| p[c]).sum::<f64>() / n)
        .collect();
    // 0 · log 0 = 0; a class with p(y|x) > 0 has p(y) > 0.
    let kl = |p: &Vec<f64>| -> f64 {
        p.iter()
            .zip(&marginal)
            .filter(|(pc, _)| **pc > 0.0)
            .map(|(pc, mc)| pc * (pc / mc).ln())
            .sum()
    };
    Some((probs.iter().map(kl).sum::<f64>() / n).exp())
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition itself: every (positive, negative) pair, ties counting one half.
    fn auroc_by_pairs(scores: &[f64], positive: &[bool]) -> f64 {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (i, &si) in scores.iter().enumerate() {
            for (j, &sj) in scores.iter().enumerate() {
                if positive[i] && !positive[j] {
                    pairs += 1.0;
                    wins += if si > sj {
                        1.0
                    } else if si == sj {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        wins / pairs
    }

    #[test]
    fn auroc_matches_the_pairwise_definition_with_ties() {
        let scores = [0.9, 0.8, 0.8, 0.7, 0.6, 0.55, 0.55, 0.4, 0.3, 0.1];
        let positive = [
            true, false, true, true, false, true, false, false, true, false,
        ];
        let direct = auroc_by_pairs(&scores, &positive);
        // By hand: 25 pairs; positives 0.9 (5 wins), 0.8 (4.5), 0.7 (4), 0.55 (2.5), 0.3 (1).
        assert!((direct - 17.0 / 25.0).abs() < 1e-12, "{direct}");
        assert!((auroc(&scores, &positive).unwrap() - direct).abs() < 1e-12);
        let perfect = [true, true, false, false];
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &perfect), Some(1.0));
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &perfect), Some(0.0));
        assert_eq!(auroc(&[0.5; 4], &perfect), Some(0.5));
        assert_eq!(auroc(&[0.5, 0.6], &[true, true]), None);
    }

    #[test]
    fn inception_score_like_by_hand() {
        // Two images, p(y) = (0.6, 0.4): KL = 0.8 ln(0.8/0.6) + 0.2 ln(0.2/0.4) and
        // 0.4 ln(0.4/0.6) + 0.6 ln(0.6/0.4); exp of their mean is 1.0901383575693508 (Python).
        let probs = vec![vec![0.8, 0.2], vec![0.4, 0.6]];
        let kl1 = 0.8 * (4.0f64 / 3.0).ln() + 0.2 * 0.5f64.ln();
        let kl2 = 0.4 * (2.0f64 / 3.0).ln() + 0.6 * 1.5f64.ln();
        let is = inception_score_like(&probs).unwrap();
        assert!((is - ((kl1 + kl2) / 2.0).exp()).abs() < 1e-12);
        assert!((is - 1.090_138_357_569_350_8).abs() < 1e-12);
        let three = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]];
        let three: Vec<Vec<f64>> = three.iter().map(|r| r.to_vec()).collect();
        assert!((inception_score_like(&three).unwrap() - 1.333_955_109_430_172).abs() < 1e-12);
        // Certain and balanced: the number of classes; all alike: 1; a zero probability is fine.
        let certain = vec![
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 1.0],
        ];
        assert!((inception_score_like(&certain).unwrap() - 3.0).abs() < 1e-12);
        let alike = vec![vec![0.3, 0.7]; 4];
        assert!((inception_score_like(&alike).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(inception_score_like(&[]), None);
    }

    #[test]
    fn confusion_metrics_by_hand() {
        // Truth 0: 3 right, 1 as class 1; truth 1: 2 right; truth 2: 1 as class 0, never predicted.
        let mut c = Confusion::new(3);
        for (t, p) in [(0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (2, 0)] {
            c.add(t, p);
        }
        assert_eq!(c.total(), 7);
        assert!((c.accuracy() - 5.0 / 7.0).abs() < 1e-12);
        assert!((c.precision(0) - 0.75).abs() < 1e-12);
        assert!((c.recall(0) - 0.75).abs() < 1e-12);
        assert!((c.precision(1) - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.recall(1) - 1.0).abs() < 1e-12);
        assert!((c.f1(1) - 0.8).abs() < 1e-12);
        assert_eq!((c.precision(2), c.recall(2), c.f1(2)), (0.0, 0.0, 0.0));
        assert!((c.macro_f1() - (0.75 + 0.8) / 3.0).abs() < 1e-12);
    }
}
