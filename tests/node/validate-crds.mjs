// Validates Kubernetes custom resources (JSON array on stdin) against their published CRD
// schemas (@kubernetes-models): GKE ComputeClass, Karpenter NodePool and EC2NodeClass.
// Prints one JSON line per object: {"kind", "name", "ok", "error"}; exits 1 if any fails.
import { ComputeClass } from "@kubernetes-models/gke/cloud.google.com/v1/ComputeClass";
import { NodePool } from "@kubernetes-models/karpenter/karpenter.sh/v1/NodePool";
import { EC2NodeClass } from "@kubernetes-models/karpenter/karpenter.k8s.aws/v1/EC2NodeClass";

const models = {
  "cloud.google.com/v1/ComputeClass": ComputeClass,
  "karpenter.sh/v1/NodePool": NodePool,
  "karpenter.k8s.aws/v1/EC2NodeClass": EC2NodeClass,
};
let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const obj of JSON.parse(input)) {
  const Model = models[`${obj.apiVersion}/${obj.kind}`];
  const name = obj.metadata?.name;
  if (!Model) {
    console.log(JSON.stringify({ kind: obj.kind, name, ok: false, error: "no schema known" }));
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(JSON.stringify({ kind: obj.kind, name, ok: true }));
  } catch (e) {
    console.log(JSON.stringify({ kind: obj.kind, name, ok: false, error: String(e.message) }));
    failed++;
  }
}
process.exit(failed ? 1 : 0);
