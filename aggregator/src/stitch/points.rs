//! The observation points one flow table refers to, interned: each point's names are held once,
//! and the connections seen there refer to it by a 4-byte [`PointId`] (the table's entries are
//! what a live flow costs; see BENCHMARKS.md). Each point's rank (see the module docs of
//! `stitch`) is computed once, when the point is first seen.
//!
//! Points no connection refers to any more (pods come and go, and with them their veths) are
//! forgotten by a mark and sweep that the table runs when the points have doubled since the last
//! one ([`Points::should_collect`], [`Points::collect`]): amortized O(1), and never more than
//! twice the points in use.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use super::InterfaceKinds;
use crate::observation::ObservationPoint;

/// An observation point as a flow table holds it, shared by the flows that leave the table.
pub type Point = Arc<ObservationPoint>;

/// A point of one table's [`Points`]; meaningless in any other table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PointId(u32);

impl PointId {
    /// No point: an empty slot of a connection's arrays.
    pub const NONE: PointId = PointId(u32::MAX);

    pub fn is_none(self) -> bool {
        self == Self::NONE
    }

    fn index(self) -> usize {
        self.0 as usize
    }
}

struct Slot {
    /// `None` while the slot is free.
    point: Option<Point>,
    rank: u8,
    /// A pod's own interface (see [`InterfaceKinds::is_pod_side`]).
    pod_side: bool,
}

pub struct Points {
    slots: Vec<Slot>,
    ids: HashMap<Point, PointId>,
    free: Vec<PointId>,
    collect_at: usize,
}

impl Default for Points {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            ids: HashMap::new(),
            free: Vec::new(),
            collect_at: Self::MIN_COLLECT_AT,
        }
    }
}

impl Points {
    const MIN_COLLECT_AT: usize = 1024;

    /// The id of `point`, interned if it is new (never collects: see [`Points::collect`]).
    pub fn intern(&mut self, point: &ObservationPoint, kinds: &InterfaceKinds) -> PointId {
        if let Some(&id) = self.ids.get(point) {
            return id;
        }
        let shared = Arc::new(point.clone());
        let slot = Slot {
            point: Some(shared.clone()),
            rank: kinds.rank(point),
            pod_side: kinds.is_pod_side(&point.interface),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id.index()] = slot;
                id
            }
            None => {
                let id = PointId(u32::try_from(self.slots.len()).expect("fewer than 2^32 points"));
                self.slots.push(slot);
                id
            }
        };
        self.ids.insert(shared, id);
        id
    }

    /// The point of `id`.
    pub fn get(&self, id: PointId) -> &Point {
        self.slots[id.index()]
            .point
            .as_ref()
            .expect("a point id of this table, in use")
    }

    /// The rank of `id` for the direction it sees (lower is nearer the sender).
    pub fn rank(&self, id: PointId) -> u8 {
        self.slots[id.index()].rank
    }

    /// Whether `id` is a pod's own interface (the host end of its veth), not a node's.
    pub fn is_pod_side(&self, id: PointId) -> bool {
        self.slots[id.index()].pod_side
    }

    /// Whether the points have doubled since the last collection.
    pub fn should_collect(&self) -> bool {
        self.ids.len() >= self.collect_at
    }

    /// Forgets every point that `mark_in_use` does not mark: it is given a function to call with
    /// each id that something still refers to.
    pub fn collect(&mut self, mark_in_use: impl FnOnce(&mut dyn FnMut(PointId))) {
        let mut in_use = vec![false; self.slots.len()];
        mark_in_use(&mut |id| in_use[id.index()] = true);
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if !in_use[index]
                && let Some(point) = slot.point.take()
            {
                self.ids.remove(&point);
                self.free.push(PointId(index as u32));
            }
        }
        self.collect_at = Self::MIN_COLLECT_AT.max(2 * self.ids.len());
    }

    /// Points held (in use, or not yet collected).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use crate::observation::Hook;

    use super::*;

    fn point(i: usize) -> ObservationPoint {
        ObservationPoint {
            node: "node-a".into(),
            interface: format!("veth{i}"),
            hook: Hook::Ingress,
        }
    }

    #[test]
    fn points_are_shared_ranked_and_forgotten_when_unused() {
        let kinds = InterfaceKinds::default();
        let mut points = Points::default();
        let kept = points.intern(&point(0), &kinds);
        assert_eq!(kept, points.intern(&point(0), &kinds), "one id");
        assert_eq!(points.rank(kept), 0, "a pod veth's ingress");
        let eth = ObservationPoint {
            node: "node-a".into(),
            interface: "eth0".into(),
            hook: Hook::Ingress,
        };
        let eth = points.intern(&eth, &kinds);
        assert_eq!(points.rank(eth), 2, "a host interface's ingress");
        for i in 2..Points::MIN_COLLECT_AT {
            points.intern(&point(i), &kinds);
        }
        assert_eq!(points.len(), Points::MIN_COLLECT_AT);
        assert!(points.should_collect());
        points.collect(|mark| mark(kept));
        assert_eq!(points.len(), 1, "only the point in use");
        assert!(!points.should_collect());
        assert_eq!(points.get(kept).interface, "veth0");
        assert_eq!(points.intern(&point(0), &kinds), kept, "the same id");
        // A new point takes a freed slot.
        let new = points.intern(&point(5_000), &kinds);
        assert!(new.0 < Points::MIN_COLLECT_AT as u32);
        assert_eq!(points.get(new).interface, "veth5000");
        assert_eq!(points.len(), 2);
    }
}
