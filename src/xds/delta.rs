//! The incremental (delta) ADS stream: the server sends the resources
//! that changed and the names removed, not every resource of a type.
//!
//! What must hold: the same state, translation and swap as the state of
//! the world stream ([`super::ads`]); CDS and LDS are wildcard
//! subscriptions, EDS and RDS subscribe and unsubscribe by name as the
//! accepted clusters and listeners change, SDS names the two secrets; a response is ACKed (its nonce
//! echoed) only after the config it makes runs on every worker, NACKed
//! with an `error_detail` naming the resource and field otherwise, and a
//! NACKed response changes nothing (not even the resources of it that
//! were fine); a new stream's first requests carry every resource version
//! held (`initial_resource_versions`), so a server resumes rather than
//! resends.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse},
    },
    google::rpc,
};

use super::{
    ads::{
        connect, failed, kind_name, known, next_batch, node, subscribed_url, State, CDS, EDS, LDS,
        OUTBOUND_QUEUE, RDS, RESOURCES_PER_RESPONSE_MAX, SDS,
    },
    Status,
};
use crate::{config::xds::Xds, control::Controller};

fn request(node: &Node, type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: type_url.to_string(),
        ..DeltaDiscoveryRequest::default()
    }
}

/// One delta stream, until it ends (as [`super::ads`]'s session).
pub(super) async fn session(
    config: &Xds,
    controller: &Controller,
    status: &Status,
    state: &mut State,
) -> Result<bool, (bool, ())> {
    let fail = |got: bool, what: String| failed(config, status, got, what);
    let mut client = connect(config).await.map_err(|e| fail(false, e))?;
    let (tx, rx) = tokio::sync::mpsc::channel(OUTBOUND_QUEUE);
    let node = node(config);
    // Wildcards (an empty first subscription), then the names waited for,
    // each with the versions held.
    let mut first = Vec::new();
    for (url, names) in [
        (CDS, BTreeSet::new()),
        (EDS, state.wanted_eds()),
        (LDS, BTreeSet::new()),
        (RDS, state.wanted_rds()),
        (SDS, state.wanted_sds()),
    ] {
        let named = url == EDS || url == RDS || url == SDS;
        if !subscribed_url(config, url) || (named && names.is_empty()) {
            continue;
        }
        let mut req = request(&node, url);
        req.resource_names_subscribe = names.iter().cloned().collect();
        req.initial_resource_versions = state
            .versions
            .get(url)
            .map(|v| v.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        state.subs.entry(url).or_default().names = names;
        first.push(req);
    }
    for req in first {
        let _ = tx.send(req).await;
    }
    let mut inbound = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| fail(false, format!("stream: {e}")))?
        .into_inner();
    status.connected(true, None);
    tracing::info!(server = %config.server, node = %config.node_id, "xds: delta stream open");
    let mut got_any = false;
    loop {
        // Deltas do not supersede each other: every response that queued
        // is folded in, in order, and the lot applied in one swap; each is
        // answered by its nonce.
        let queued = next_batch(&mut inbound)
            .await
            .map_err(|e| fail(got_any, e))?;
        got_any = true;
        for req in handle_batch(queued, &node, controller, status, state) {
            if subscribed_url(config, &req.type_url) {
                let _ = tx.send(req).await;
            }
        }
    }
}

/// Applies responses that queued together in one swap: each is folded
/// in (one that does not translate is NACKed and left out), then the
/// result is applied once and every folded response ACKed. If that swap
/// is refused, each is applied on its own instead, so that the one at
/// fault is the one NACKed.
fn handle_batch(
    batch: Vec<DeltaDiscoveryResponse>,
    node: &Node,
    controller: &Controller,
    status: &Status,
    state: &mut State,
) -> Vec<DeltaDiscoveryRequest> {
    if batch.len() == 1 {
        let resp = batch.into_iter().next().expect("one");
        return handle(resp, node, controller, status, state);
    }
    let mut candidate = state.clone();
    let mut out = Vec::new();
    let mut folded = Vec::new();
    for resp in batch {
        let Some(type_url) = known(&resp.type_url) else {
            out.extend(handle(resp, node, controller, status, state));
            continue;
        };
        // Translated apart first, so a refused response leaves nothing.
        let mut scratch = State::default();
        scratch.versions = candidate.versions.clone();
        scratch.secret_names = candidate.secret_names.clone();
        match fold(type_url, &resp, &mut scratch) {
            Ok(()) => {
                candidate.absorb(type_url, scratch, &resp.removed_resources);
                folded.push(resp);
            }
            Err(why) => {
                let kind = kind_name(type_url);
                tracing::warn!(kind, error = %why, "xds: delta push refused; the last good config keeps serving");
                status.rejected(kind, &why);
                let mut nack = request(node, type_url);
                nack.response_nonce = resp.nonce;
                nack.error_detail = Some(status_of(why));
                out.push(nack);
            }
        }
    }
    if folded.is_empty() {
        return out;
    }
    if candidate.put_into_effect(state, controller).is_err() {
        for resp in folded {
            out.extend(handle(resp, node, controller, status, state));
        }
        return out;
    }
    let subs = std::mem::take(&mut state.subs);
    *state = candidate;
    state.subs = subs;
    for resp in folded {
        let type_url = known(&resp.type_url).expect("folded above");
        status.accepted(
            kind_name(type_url),
            &resp.system_version_info,
            state.count(type_url),
        );
        let mut ack = request(node, type_url);
        ack.response_nonce = resp.nonce;
        out.push(ack);
    }
    tracing::info!(
        responses = out.len(),
        "xds: delta pushes applied in one swap"
    );
    for (url, added, removed) in state.resubscribe() {
        let mut req = request(node, url);
        req.resource_names_subscribe = added;
        req.resource_names_unsubscribe = removed;
        out.push(req);
    }
    out
}

/// Applies one delta response; returns the ACK or NACK, and any change of
/// EDS or RDS names it caused.
fn handle(
    resp: DeltaDiscoveryResponse,
    node: &Node,
    controller: &Controller,
    status: &Status,
    state: &mut State,
) -> Vec<DeltaDiscoveryRequest> {
    let Some(type_url) = known(&resp.type_url) else {
        let other = resp.type_url.as_str();
        let mut nack = request(node, other);
        nack.response_nonce = resp.nonce.clone();
        nack.error_detail = Some(status_of(format!("type {other} was not subscribed to")));
        return vec![nack];
    };
    let kind = kind_name(type_url);
    let mut candidate = state.clone();
    let outcome = fold(type_url, &resp, &mut candidate)
        .and_then(|()| candidate.put_into_effect(state, controller));
    let mut answer = request(node, type_url);
    answer.response_nonce = resp.nonce.clone();
    match outcome {
        Err(why) => {
            tracing::warn!(kind, version = %resp.system_version_info, error = %why, "xds: delta push refused; the last good config keeps serving");
            status.rejected(kind, &why);
            answer.error_detail = Some(status_of(why));
            vec![answer]
        }
        Ok(_) => {
            let subs = std::mem::take(&mut state.subs);
            *state = candidate;
            state.subs = subs;
            let count = state.count(type_url);
            status.accepted(kind, &resp.system_version_info, count);
            tracing::info!(kind, version = %resp.system_version_info, resources = count, "xds: delta push applied");
            let mut out = vec![answer];
            for (url, added, removed) in state.resubscribe() {
                let mut req = request(node, url);
                req.resource_names_subscribe = added;
                req.resource_names_unsubscribe = removed;
                out.push(req);
            }
            out
        }
    }
}

fn status_of(message: String) -> rpc::Status {
    rpc::Status {
        // INVALID_ARGUMENT
        code: 3,
        message,
        details: Vec::new(),
    }
}

/// Folds the changed and removed resources into `state`.
fn fold(
    type_url: &'static str,
    resp: &DeltaDiscoveryResponse,
    state: &mut State,
) -> Result<(), String> {
    let n = resp.resources.len() + resp.removed_resources.len();
    if n > RESOURCES_PER_RESPONSE_MAX {
        return Err(format!(
            "{n} resources in one response; the limit is {RESOURCES_PER_RESPONSE_MAX}"
        ));
    }
    let mut versions: BTreeMap<String, String> =
        state.versions.remove(type_url).unwrap_or_default();
    let mut seen = BTreeSet::new();
    for (i, r) in resp.resources.iter().enumerate() {
        let Some(any) = &r.resource else {
            return Err(format!("resources[{i}] ({:?}) has no resource", r.name));
        };
        let name = state.upsert(type_url, any, &format!("resources[{i}].resource"))?;
        if name != r.name {
            return Err(format!(
                "resources[{i}] is named {:?} but holds {name:?}",
                r.name
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(format!("resource {name:?} appears twice"));
        }
        versions.insert(name, r.version.clone());
    }
    for name in &resp.removed_resources {
        state.remove(type_url, name);
        versions.remove(name);
    }
    state.versions.insert(type_url, versions);
    Ok(())
}
